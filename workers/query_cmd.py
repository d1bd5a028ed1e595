"""`vmh query add|ls|rm`: standing queries on the log-compacted queries topic."""

from __future__ import annotations

import argparse
import sys

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "bootstrap-servers", "topic-prefix")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register or replace a standing query")
    add.add_argument("text", nargs="?", help="what to find, in words")
    add.add_argument("--id", dest="query_id", help="query id (default: a new random id)")
    add.add_argument("--threshold", type=int, default=None,
                     help="largest Hamming distance that matches (default 24 of 128 bits)")
    add.add_argument("--code", help="a raw packed code in hex instead of text")
    actions.add_parser("ls", help="list the registered queries")
    rm = actions.add_parser("rm", help="delete a standing query")
    rm.add_argument("query_id")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.records import InvalidQuery
    from pipeline.client import DEFAULT_THRESHOLD, Client

    client = Client(args.bootstrap_servers, args.topic_prefix)
    try:
        if args.action == "add":
            if not args.text and not args.code:
                raise InvalidQuery("give the query as TEXT or as --code HEX")
            code = bytes.fromhex(args.code) if args.code else None
            threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
            print(client.add_query(args.text, code=code, query_id=args.query_id, threshold=threshold))
        elif args.action == "ls":
            for query_id, query in sorted(client.queries().items()):
                what = query.text if query.text is not None else f"code {query.code.tobytes().hex()}"
                print(f"{query_id}\tthreshold {query.threshold}\t{what}")
        else:
            client.remove_query(args.query_id)
    except (InvalidQuery, ValueError) as e:
        print(f"vmh query {args.action}: {e}", file=sys.stderr)
        return 2
    return 0
