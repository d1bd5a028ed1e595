"""`vmh extract VIDEOS_DIR --out FEATURES_DIR`: per-second features of a folder of videos, for training."""

from __future__ import annotations

import argparse
import sys

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos_dir", help="folder of video files; each file's stem is its video id")
    parser.add_argument("--out", required=True, help="features directory (<video_id>.npy and manifest.json)")
    add_settings(parser, "backbone", "backbone-weights", "frame-size", "sample-rate", "spatial-grid", "motion-grid", "motion-planes", "motion-expansion",
                 "device", "torch-threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.device import DeviceUnavailable
    from pipeline.features.backbone import BackboneError, FrameEncoder
    from pipeline.training.extract import FeatureError, extract_features
    from pipeline.video.source import SourceError

    # batches of frames through the CNN do gain from a second core
    torch.set_num_threads(args.torch_threads or 2)
    try:
        encoder = FrameEncoder.from_args(args)
        result = extract_features(args.videos_dir, args.out, encoder, progress=not args.no_progress)
    except (ValueError, OSError, BackboneError, DeviceUnavailable, FeatureError, SourceError) as e:
        print(f"vmh extract: {e}", file=sys.stderr)
        return 2
    print(f"extracted {len(result.extracted)} videos, {len(result.skipped)} already there, into {args.out}")
    if result.failed:
        n = len(result.failed)
        print(f"vmh extract: {n} video{'s' if n > 1 else ''} could not be decoded and {'were' if n > 1 else 'was'} left out: "
              f"{', '.join(sorted(result.failed))}", file=sys.stderr)
        return 1
    return 0
