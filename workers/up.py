"""`vmh up`: the whole system on one machine. A local broker when no bootstrap servers are given, the topics, and
the encoder, query worker, web view and (for any sources given) producer as child processes; Ctrl-C stops them all."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="[ID=]SOURCE", help="streams to push right away (optional)")
    parser.add_argument("--realtime", action="store_true", help="pace file sources as if they were live")
    parser.add_argument("--loop", action="store_true", help="repeat file sources")
    add_settings(parser, "checkpoint", "bootstrap-servers", "broker-port", "topic-prefix", "metrics-port", "ui-address",
                 "ui-port", "cache-dir")


class System:
    """The child processes of `vmh up`, started and stopped together."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=self.env)
        self.children[name] = child
        return child

    def failed(self) -> str | None:
        """The name of a worker that exited with an error, if any (producers may end when their files do)."""
        for name, child in self.children.items():
            code = child.poll()
            if code not in (None, 0):
                return f"{name} exited with code {code}"
        return None

    def stop(self, timeout: float = 20.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_until_consuming(bootstrap: str, groups: list[str], timeout: float = 120.0) -> None:
    """Block until every consumer group is stable with members, i.e. the workers have loaded their models and
    joined; live streams pushed before that would queue up and show the start-up time as latency."""
    from kafka.errors import KafkaError

    from pipeline.bus.kafka import admin_client

    admin = admin_client(bootstrap)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                described = admin.describe_groups(groups)
                if all(g["group_state"] == "Stable" and g["members"] for g in described.values()):
                    return
            except KafkaError:  # e.g. no group coordinator yet on a broker that has never hosted a group
                pass
            time.sleep(0.5)
        raise TimeoutError(f"workers did not join consumer groups {groups} within {timeout:.0f} s")
    finally:
        admin.close()


def start_system(args: argparse.Namespace, checkpoint: Path) -> tuple[System, str, bool]:
    """Broker (if needed), topics and workers; returns the system, the bootstrap servers and whether we started
    the broker (so the caller stops it)."""
    from pipeline.bus.broker import broker_status, ensure_broker
    from pipeline.bus.topics import create_topics

    bootstrap, own_broker = args.bootstrap_servers, False
    if not bootstrap:
        own_broker = broker_status(args.broker_port, cache_dir=args.cache_dir) is None
        bootstrap = ensure_broker(args.broker_port, cache_dir=args.cache_dir)
    create_topics(bootstrap, prefix=args.topic_prefix)
    env = dict(os.environ, VMH_BOOTSTRAP_SERVERS=bootstrap, VMH_TOPIC_PREFIX=args.topic_prefix,
               VMH_CHECKPOINT=str(checkpoint))
    system = System(env)
    port = args.metrics_port
    metrics = lambda offset: ["--metrics-port", str(port + offset if port else 0)]  # noqa: E731
    system.start("encoder", "encoder", *metrics(1))
    system.start("query-worker", "query-worker", *metrics(2))
    system.start("ui", "ui", "--ui-address", args.ui_address, "--ui-port", str(args.ui_port))
    if args.sources:
        start_producers(system, args.sources, *["--realtime"] * args.realtime, *["--loop"] * args.loop,
                        metrics_port=port)
    return system, bootstrap, own_broker


def spread(sources: list[str], processes: int = 0) -> list[list[str]]:
    """``sources`` dealt round-robin over ``processes`` producers (0: one per core), none left empty. A producer runs
    its CNN on one thread: one producer for 24 synthetic streams fell behind on a 2-core AMD EPYC (events 3 to 7 s
    after capture, the demo's precision and recall down from 0.95 / 0.73 to 0.87 / 0.62)."""
    count = min(len(sources), processes or os.cpu_count() or 1)
    return [sources[i::count] for i in range(count)]


def start_producers(system: System, sources: list[str], *flags: str, metrics_port: int = 0) -> list[subprocess.Popen]:
    """One producer per core (``spread``); the first serves metrics on ``metrics_port``, the others after the
    encoder's and query worker's (+1, +2) on +3, +4, ... (0: each its own free port)."""
    chunks = spread(sources)
    ports = [metrics_port + (2 + i if i else 0) if metrics_port else 0 for i in range(len(chunks))]
    return [system.start(f"producer-{i}", "producer", *chunk, *flags, "--metrics-port", str(port))
            for i, (chunk, port) in enumerate(zip(chunks, ports))]


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.broker import stop_broker
    from pipeline.weights import published_checkpoint
    from workers.ui import address

    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else published_checkpoint()
    except FileNotFoundError as error:
        print(f"vmh up: {error}; pass --checkpoint", file=sys.stderr)
        return 2
    if not (checkpoint / "config.json").is_file():
        print(f"vmh up: no checkpoint at {checkpoint}: pass another --checkpoint, or none for the published model",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop the children, rather than orphan them; SIGINT too when this
        signal.signal(sig, _interrupt)           # process was started with it ignored (a shell's background job)
    system, bootstrap, own_broker = start_system(args, checkpoint)
    print(f"vmh up: broker {bootstrap}, topics {args.topic_prefix}.*, workers "
          f"{', '.join(system.children)}; web view {address(args.ui_address, args.ui_port)}; Ctrl-C stops everything",
          flush=True)
    try:
        while (problem := system.failed()) is None:
            time.sleep(0.5)
        print(f"vmh up: {problem}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        system.stop()
        if own_broker:
            stop_broker(args.broker_port, cache_dir=args.cache_dir)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
