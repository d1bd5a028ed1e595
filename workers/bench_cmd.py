"""`vmh bench NAME [--json]`: one benchmark of a pipeline stage against a reference implementation.

Prints a table (or, with --json, one JSON object: name, ratio, reference, median_ours, median_reference, unit,
target, check, params, machine, cases) and exits 1 when the correctness check failed. A missed target is reported,
not an error: the figures are what they are on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from workers.bench import BENCHMARKS, load

    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name in BENCHMARKS:
        bench = load(name)
        command = sub.add_parser(name, help=bench.TITLE, description=f"{bench.TITLE}. Reference: {bench.REFERENCE}")
        command.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        command.add_argument("--repeats", type=int, default=bench.REPEATS,
                             help="timed calls of each side [%(default)s]")
        command.add_argument("--warmup", type=int, default=bench.WARMUP,
                             help="untimed (but checked) calls of each side first [%(default)s]")
        command.add_argument("--threads", type=int, default=0,
                             help="torch threads for both sides; 0 keeps torch's default [%(default)s]")
        for f in dataclasses.fields(bench.Params):
            command.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                                 help=f"{f.metadata['help']} [%(default)s]")


def run(args: argparse.Namespace) -> int:
    from workers.bench import load
    from workers.bench.runner import run_benchmark, table

    bench = load(args.benchmark)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    params = bench.Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(bench.Params)})
    if hasattr(bench, "cases"):  # an interleaved comparison of two callables
        result = run_benchmark(bench, params, args.repeats, args.warmup)
        text = table(result, bench.TITLE)
    else:  # a benchmark that measures and tabulates in its own way (e2e's capacity search)
        result = bench.measure(params)
        text = bench.table(result)
    print(json.dumps(result) if args.json else text)
    return 0 if result["check"]["passed"] else 1
