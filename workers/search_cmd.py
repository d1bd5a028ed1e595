"""`vmh search TEXT`: the archived moments nearest to a text, over a recent time range."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from pipeline.settings import add_settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """'90s', '15m', '1h', '2d' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="what to find, in words")
    parser.add_argument("--code", help="a raw packed code in hex instead of text")
    parser.add_argument("--since", type=duration, default=None, help="only moments captured this long ago or later")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the query workers")
    parser.add_argument("--json", action="store_true")
    add_settings(parser, "bootstrap-servers", "topic-prefix")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.records import InvalidQuery
    from pipeline.client import Client

    since = time.time() - args.since if args.since is not None else None
    code = bytes.fromhex(args.code) if args.code else None
    try:
        hits = Client(args.bootstrap_servers, args.topic_prefix).search(
            args.text, code=code, since=since, top_k=args.top_k, timeout=args.timeout)
    except InvalidQuery as e:
        print(f"vmh search: {e}", file=sys.stderr)
        return 2
    for hit in hits:
        if args.json:
            print(json.dumps(hit))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(hit["capture_time"]))
            print(f"{hit['stream_id']} {hit['start']}s-{hit['end']}s distance {hit['distance']} captured {when}")
    return 0
