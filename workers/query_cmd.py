"""`vmh query add|ls|rm`: standing queries on the log-compacted queries topic."""

from __future__ import annotations

import argparse
import sys

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register or replace a standing query")
    add.add_argument("text", nargs="?", help="what to find, in words")
    add.add_argument("--id", dest="query_id", help="query id (default: a new random id)")
    add.add_argument("--threshold", type=int, default=None,
                     help="largest Hamming distance that matches [default: the threshold calibrated with the "
                          "model, read from --checkpoint or else applied by the query worker]")
    add.add_argument("--code", help="a raw packed code in hex instead of text")
    ls = actions.add_parser("ls", help="list the registered queries")
    rm = actions.add_parser("rm", help="delete a standing query")
    rm.add_argument("query_id")
    for action in (add, ls, rm):
        add_settings(action, "bootstrap-servers", "topic-prefix", *(["checkpoint"] if action is not rm else []))


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.records import InvalidQuery
    from pipeline.client import Client
    from pipeline.model import CheckpointError

    client = Client(args.bootstrap_servers, args.topic_prefix, getattr(args, "checkpoint", None))
    try:
        if args.action == "add":
            if not args.text and not args.code:
                raise InvalidQuery("give the query as TEXT or as --code HEX")
            code = bytes.fromhex(args.code) if args.code else None
            print(client.add_query(args.text, code=code, query_id=args.query_id, threshold=args.threshold))
        elif args.action == "ls":
            default = client.default_threshold
            model = f"the model's ({default} bits)" if default is not None else "the model's"
            for query_id, query in sorted(client.queries().items()):
                what = query.text if query.text is not None else f"code {query.code.tobytes().hex()}"
                threshold = model if query.threshold is None else f"{query.threshold} bits"
                print(f"{query_id}\tthreshold {threshold}\t{what}")
        else:
            client.remove_query(args.query_id)
    except (InvalidQuery, ValueError, CheckpointError) as e:
        print(f"vmh query {args.action}: {e}", file=sys.stderr)
        return 2
    return 0
