"""`vmh train --dataset KIND:PATH --features DIR --out CHECKPOINT`: train CMHN on extracted features."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.training.options import TrainOptions

    parser.add_argument("--dataset", required=True, help="annotations as KIND:PATH, e.g. activitynet:DIR/train.json")
    parser.add_argument("--val", help="validation annotations as KIND:PATH [default: val.json beside a train.json]")
    parser.add_argument("--features", required=True, help="features directory written by `vmh extract`")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (the best validation epoch)")
    add_settings(parser, "preset", "device", "torch-threads", "cache-dir")
    parser.add_argument("--bits", type=int, default=None, help="code length in bits [default: the preset's]")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--causal", action="store_true", default=True, help="causal TCN, as served live [default]")
    form.add_argument("--bidirectional", dest="causal", action="store_false", help="the published TCN that looks ahead")
    parser.add_argument("--epochs", type=int, default=None, help="epochs [default: the preset's]")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate [default: the preset's]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the video order, RReLU and dropout")
    recipe = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    for name, kind, what in (
        ("videos_per_step", int, "videos whose sentences and candidates are scored together each step"),
        ("step_videos", str, "how each step's videos are drawn: random, or similar (a video and those whose captions "
                              "are nearest its own: look-alikes)"),
        ("negative_weight", float, "weight of sentence-candidate pairs from different videos"),
        ("contrastive_weight", float, "weight of the two-way contrastive term over the step's codes"),
        ("whiten", int, "dims the video features are PCA-whitened to, 0 for none (None: the preset's)"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{what} [default: {recipe[name]}]")
    parser.add_argument("--select", choices=("alerts", "recall"), default=None,
                        help=f"what picks the epoch kept: validation alert F1 or R@1 [default: {recipe['select']}]")
    parser.add_argument("--backwards", action="store_true",
                        help="also train on every training video played backwards, its actions reversed (synthetic "
                             "datasets: left and right, up and down, grow and shrink)")
    parser.add_argument("--published", action="store_true",
                        help="the CMHN reference's recipe: one video a step, its loss alone, best R@1 kept")
    parser.add_argument("--resume", action="store_true", help="continue the run at --out from its training state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.datasets import load_dataset, parse_dataset_spec
    from pipeline.device import DeviceUnavailable, pick_device
    from pipeline.features.sentence import SentenceEncoder
    from pipeline.model import CheckpointError
    from pipeline.training.backwards import with_backwards
    from pipeline.training.evaluate import build_samples
    from pipeline.training.extract import FeatureError, FeatureSet
    from pipeline.training.train import TrainError, TrainOptions, train

    # one video a step: ops too small to split (2 threads made lite 5x slower here)
    torch.set_num_threads(args.torch_threads or 1)
    try:
        val_spec = args.val or default_val_spec(args.dataset)
        (kind, path), (val_kind, val_path) = parse_dataset_spec(args.dataset), parse_dataset_spec(val_spec)
        device = pick_device(args.device)
        features = FeatureSet.open(args.features)
        sentences = SentenceEncoder(str(device), cache_dir=args.cache_dir)
        train_videos, train_features = load_dataset(kind, path), features
        if args.backwards:
            train_videos, train_features = with_backwards(train_videos, features)
        train_samples = build_samples(train_videos, train_features, sentences.encode, device)
        val_samples = build_samples(load_dataset(val_kind, val_path), features, sentences.encode, device)
        recipe = {name: value for name in ("videos_per_step", "step_videos", "negative_weight", "contrastive_weight",
                                           "whiten", "select")
                  if (value := getattr(args, name, None)) is not None}
        build = TrainOptions.published if args.published else TrainOptions
        options = build(preset=args.preset, bits=args.bits, causal=args.causal, epochs=args.epochs, lr=args.lr,
                        seed=args.seed, **recipe)
        result = train(
            options, train_samples, val_samples, args.out,
            extractor=features.extractor,
            sentence_encoder=sentences.identity()["sentence_encoder"],
            resume=args.resume,
            progress=not args.no_progress,
            extra={"dataset": args.dataset, "val": val_spec, "features": str(args.features),
                   **({"backwards": True} if args.backwards else {})},
        )  # fmt: skip
    except (ValueError, OSError, DeviceUnavailable, FeatureError, CheckpointError, TrainError) as e:
        print(f"vmh train: {e}", file=sys.stderr)
        return 2
    if result.epochs_run == 0:
        print(f"{args.out}: the run was already complete")
    from pipeline.training.train import SELECTIONS

    print(f"best validation {SELECTIONS[options.resolved().select]} {result.best_score:.3f} at epoch "
          f"{result.best_epoch}: {result.checkpoint}; "
          f"alert threshold {result.threshold} bits (highest alert F1 on the validation split)")
    return 0


def default_val_spec(dataset: str) -> str:
    """KIND:DIR/val.json for KIND:DIR/train.json; any other training path needs an explicit --val."""
    kind, _, path = dataset.partition(":")
    if Path(path).name != "train.json":
        raise ValueError(f"--val is required: no default validation split for {dataset!r} (only for .../train.json)")
    return f"{kind}:{Path(path).with_name('val.json')}"
