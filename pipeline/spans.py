"""Temporal spans [start, end) in seconds: their IoU, and a candidate's best IoU with a sentence's ground truth.

One implementation for the training target (CMHN's S), the evaluation metrics and the demo's hit test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def as_spans(spans: ArrayLike, what: str) -> np.ndarray:
    spans = np.asarray(spans, dtype=np.float64)
    if spans.ndim < 1 or spans.shape[-1] != 2:
        raise ValueError(f"{what} must be [..., 2] (start, end) spans, got shape {spans.shape}")
    return spans


def temporal_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """IoU of every span in ``a`` [..., N, 2] with every span in ``b`` [..., M, 2] -> [..., N, M].

    An empty union (two zero-length spans) gives 0, and so does a NaN span, which pads ragged sets.
    """
    a, b = as_spans(a, "a")[..., :, None, :], as_spans(b, "b")[..., None, :, :]
    inter = (np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    return np.divide(inter, union, out=np.zeros_like(union), where=union > 0)


def ground_truth_iou(spans: ArrayLike, ground_truth: Sequence[ArrayLike]) -> np.ndarray:
    """[Q, N] IoU of each candidate with query q's ground truth, the best over its spans.

    ``ground_truth[q]`` is one (start, end) or a list of them. This is also CMHN's training target S.
    """
    spans = as_spans(spans, "spans")
    sets = []
    for q, truth in enumerate(ground_truth):
        truth = np.asarray(truth, dtype=np.float64)
        truth = truth[None] if truth.shape == (2,) else truth
        if truth.ndim != 2 or truth.shape[1] != 2 or len(truth) == 0:
            raise ValueError(f"ground truth of query {q} must be (start, end) or a non-empty list of them, "
                             f"got shape {truth.shape}")
        sets.append(truth)
    padded = np.full((len(sets), max(map(len, sets), default=0), 2), np.nan)
    for q, truth in enumerate(sets):
        padded[q, : len(truth)] = truth
    return temporal_iou(padded, spans).max(axis=1, initial=0.0)
