"""The `vmh` command: one subcommand per module, imported only when it runs.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules keep heavy imports (torch,
av) inside functions, so ``vmh --help`` and the small client commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import logs
from pipeline.settings import SettingError, add_settings

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("workers.broker_cmd", "start, stop or inspect the local Apache Kafka broker"),
    "producer": ("workers.producer", "decode live sources into per-second feature records"),
    "push": ("workers.producer", "push live streams (same as producer)"),
    "encoder": ("workers.encoder", "turn feature records into moment codes, exactly once"),
    "query-worker": ("workers.query_worker", "match moment codes against standing queries, exactly once; answer searches"),
    "query": ("workers.query_cmd", "add, list or remove standing queries"),
    "subscribe": ("workers.subscribe_cmd", "tail match events"),
    "ui": ("workers.ui", "the web view: streams, standing queries, match events with their key frames, search"),
    "search": ("workers.search_cmd", "search the recent moments by text"),
    "topics": ("workers.topics_cmd", "create the pipeline's topics"),
    "demo": ("workers.demo", "the main job: held-out videos streamed live against standing queries, every alert judged"),
    "up": ("workers.up", "the whole system on one machine: broker, topics and workers; Ctrl-C stops all"),
    "synth": ("workers.synth_cmd", "render the synthetic moment-localization dataset"),
    "extract": ("workers.extract_cmd", "per-second frame features of a folder of videos, for training"),
    "train": ("workers.train_cmd", "train a CMHN checkpoint on extracted features"),
    "ensemble": ("workers.ensemble_cmd", "join CMHN checkpoints trained apart into one with their codes side by side"),
    "eval": ("workers.eval_cmd", "recall and query latency of a CMHN checkpoint on a dataset"),
    "bench": ("workers.bench_cmd", "benchmarks against reference implementations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmh", description="Live video moment hashing")
    add_settings(parser, "log-level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except SettingError as e:  # a bad value in the environment or vmh.toml: named, not a traceback
        print(f"vmh: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
