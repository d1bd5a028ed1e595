"""Training videos played backwards: the pair that tells an action from its reverse, at no extraction cost.

Nearly half of the published two-member model's false events on its validation split were one shape and colour
growing taken for the same shape shrinking, or the other way round: the training data holds few such pairs, so
nothing made the model read which way time runs. Every synthetic action has a reverse (left and right, up and down,
grow and shrink), and a video played backwards is a video of the reverse actions: the same frames in the reverse
order, so its per-second features are the rows reversed with the motion tail's flow and expansion negated (time
running backwards turns every flow vector around; the per-second means shift by one frame pair). Each training
video is followed by itself played backwards, with the captions and labels of ``pipeline.video.synth.played_backwards``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.datasets import Video
from pipeline.features.motion import motion_dim
from pipeline.training.extract import FeatureError, FeatureSet
from pipeline.video.synth import played_backwards

SUFFIX = "~backwards"


def backwards_features(features: np.ndarray, motion: int) -> np.ndarray:
    """Per-second features [T, V] of a video played backwards: rows reversed, the last ``motion`` columns (the
    flow cells' x, y and expansion) negated."""
    out = features[::-1].copy()
    if motion:
        out[:, -motion:] *= -1
    return out


class WithBackwards(FeatureSet):
    """A features directory that also serves each of its videos played backwards, as ``<video_id>~backwards``."""

    def __init__(self, features: FeatureSet) -> None:
        videos = dict(features.videos) | {video_id + SUFFIX: rows for video_id, rows in features.videos.items()}
        super().__init__(Path(features.root), features.extractor, videos)
        self.forward, self.motion = features, motion_dim(int(features.extractor.get("motion_grid", 0)))

    def load(self, video_id: str) -> np.ndarray:
        if video_id.endswith(SUFFIX):
            return backwards_features(self.forward.load(video_id.removesuffix(SUFFIX)), self.motion)
        return self.forward.load(video_id)


def with_backwards(videos: Sequence[Video], features: FeatureSet) -> tuple[list[Video], WithBackwards]:
    """Each video followed by itself played backwards, and the features of both."""
    served = WithBackwards(features)
    out = []
    for video in videos:
        if video.video_id not in features.videos:
            raise FeatureError(f"{features.root} has no features for video {video.video_id!r}")
        out += [video, played_backwards(video, features.videos[video.video_id], video.video_id + SUFFIX)]
    return out, served
