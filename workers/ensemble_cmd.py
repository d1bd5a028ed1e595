"""`vmh ensemble MEMBER MEMBER... --out DIR`: join CMHN checkpoints trained apart into one whose codes are theirs
side by side (``pipeline.model.cmhn.ensemble``); calibrate it next with `vmh eval --alerts --calibrate`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", nargs="+", help="checkpoint directories of one architecture, frame extractor and "
                                                   "sentence encoder (two or more)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    from pipeline.model import CheckpointError, join_checkpoints

    try:
        path = join_checkpoints(args.members, args.out)
    except CheckpointError as e:
        print(f"vmh ensemble: {e}", file=sys.stderr)
        return 2
    print(f"wrote the ensemble of {len(args.members)} checkpoints to {path}; calibrate its alert threshold with "
          f"`vmh eval --alerts --calibrate --checkpoint {path} --dataset ... --features ...`")
    return 0
