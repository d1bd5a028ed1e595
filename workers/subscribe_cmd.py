"""`vmh subscribe`: tail match events as they are committed."""

from __future__ import annotations

import argparse
import time

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", help="only events of this query id")
    parser.add_argument("--stream", help="only events of this stream id")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--from-beginning", action="store_true", help="replay the events already on the topic")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds without an event")
    add_settings(parser, "bootstrap-servers", "topic-prefix")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.records import encode
    from pipeline.client import Client

    client = Client(args.bootstrap_servers, args.topic_prefix)
    try:
        for event in client.matches(args.query, args.stream, from_beginning=args.from_beginning, timeout=args.timeout):
            if args.json:
                print(encode(event).decode(), flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(event.match_time))
                print(f"{when} {event.query_id}: {event.stream_id} {event.start}s-{event.end}s "
                      f"distance {event.distance} score {event.score} latency {event.latency:.2f}s", flush=True)
    except KeyboardInterrupt:
        pass
    return 0



