"""Frame features (backbone), per-second pooling (pooling) and sentence features (sentence).

``video_features`` is the offline form of the producer's frame path, built from the same pieces, so features a
model is trained on are made exactly as the live ones it will see.
"""

from __future__ import annotations

import os
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.features.backbone import FrameEncoder

# extractor identity keys added after checkpoints and feature directories were first written, with the value every
# extractor had before them, so an identity recorded then still names the same frame path
IDENTITY_DEFAULTS = {"spatial_grid": 1, "motion_grid": 0}
# what the motion flow is taken on (pipeline.features.motion): luma (the first form, what an identity recorded before
# the planes means), or Y, U and V averaged; here, apart from the torch code, so that the settings can name them
MOTION_PLANES = ("y", "yuv")
# how a motion cell says growing or shrinking (pipeline.features.motion): the mean divergence of its flow (the first
# form, what an identity recorded before the key means), or the expansion rate of an affine fit of its moving pixels
MOTION_EXPANSIONS = ("divergence", "affine")


def complete_identity(identity: dict) -> dict:
    """An extractor identity as recorded at any time, with the keys added since filled in as they were then: motion
    was luma flow before its planes were recorded, and its cells' divergence before their expansion was."""
    if not identity:
        return dict(identity)
    full = {**IDENTITY_DEFAULTS, **identity}
    if full["motion_grid"]:
        full.setdefault("motion_planes", MOTION_PLANES[0])
        full.setdefault("motion_expansion", MOTION_EXPANSIONS[0])
    return full


def recorded_extractor(checkpoint: str | os.PathLike) -> dict:
    """The frame extractor a checkpoint directory's config records, completed (``complete_identity``); read without
    torch, so a producer or a benchmark can take its frame path from a checkpoint cheaply."""
    import json
    from pathlib import Path

    return complete_identity(json.loads(Path(checkpoint, "config.json").read_text())["extractor"])


def video_features(path: str | os.PathLike, encoder: FrameEncoder, batch_size: int = 64) -> np.ndarray:
    """float16 [T, V]: one vector per second of the video at ``path`` (T = its last second + 1), pooled as the
    producer pools them.

    A second without any sampled frame (a hole in the file) is a zero row, so row t is always second t.
    """
    from pipeline.features.pooling import SecondPooler
    from pipeline.video.source import SourceOptions, VideoSource

    source = VideoSource(os.fspath(path), options=SourceOptions(encoder.sample_rate, encoder.frame_size, live=False))
    pooler = SecondPooler(motion_dim=encoder.motion_dim)
    frames = iter(source)
    seconds = []
    while batch := list(islice(frames, batch_size)):
        seconds += pooler.add(batch, encoder.encode_frames(batch))
    seconds += pooler.flush()
    out = np.zeros((seconds[-1].second + 1, encoder.dim), np.float16)
    out[[s.second for s in seconds]] = np.stack([s.vector for s in seconds])
    encoder.forget(source.stream_id)
    return out
