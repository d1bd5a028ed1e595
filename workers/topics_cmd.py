"""`vmh topics create`: the pipeline's topics with their partitions, compaction and retention."""

from __future__ import annotations

import argparse

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("create",))
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each new topic")
    parser.add_argument("--replication-factor", type=int, default=-1, help="-1 takes the cluster's default")
    add_settings(parser, "bootstrap-servers", "topic-prefix")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.topics import TOPIC_CONFIGS, create_topics, topics

    created = create_topics(args.bootstrap_servers or None, args.topic_prefix, args.partitions, args.replication_factor)
    for kind, name in topics(args.topic_prefix).all().items():
        state = "created" if name in created else "exists"
        configs = ", ".join(f"{k}={v}" for k, v in TOPIC_CONFIGS[kind].items())
        print(f"{name}\t{state}\t{configs}")
    return 0
