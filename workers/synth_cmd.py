"""`vmh synth --out DIR`: render the synthetic moment-localization dataset (see pipeline/video/synth.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

_HELP = {
    "seed": "seed of every sampled event, caption and background; same seed, same annotations",
    "train": "number of training videos",
    "val": "number of validation videos",
    "test": "number of test videos",
    "fps": "frames per second of the rendered videos",
    "size": "side of the square frames in pixels (even)",
    "min_duration": "shortest video in seconds",
    "max_duration": "longest video in seconds",
    "min_event": "shortest event in seconds",
    "max_event": "longest event in seconds",
    "captions_per_event": "distinct phrasings annotated per event, each its own timestamp entry",
    "generator_version": "2: a video's events share colours, shapes and actions; 1: each event its own colour",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.video.synth import SynthConfig

    parser.add_argument("--out", required=True, help="dataset directory (videos/, train.json, val.json, test.json)")
    for field in dataclasses.fields(SynthConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{_HELP[field.name]} [%(default)s]"
        parser.add_argument(flag, type=type(field.default), default=field.default, help=help_text)
    parser.add_argument("--force", action="store_true", help="re-render over a directory holding a different dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.video.synth import SynthConfig, SynthError, build_dataset

    try:
        config = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
        rendered = build_dataset(args.out, config, force=args.force, progress=not args.no_progress)
    except SynthError as e:
        print(f"vmh synth: {e}", file=sys.stderr)
        return 2
    counts = f"{config.train} train / {config.val} val / {config.test} test videos"
    if rendered:
        print(f"rendered {counts} into {args.out}")
    else:
        print(f"{args.out} already holds this dataset ({counts}); skipped")
    return 0
