"""Moment-retrieval metrics: temporal IoU, greedy NMS and R@n at IoU m.

"R@n,IoU=m" is the fraction of queries for which one of the n best-scored candidates left by NMS
overlaps one of the query's ground-truth spans with IoU >= m. NMS comes in two protocols, so say
which one a number was measured with:

- a fixed threshold (``nms=0.5``), the same for every m, as 2D-TAN and most later work report;
- ``nms=PER_IOU``, the CMHN reference (utils/tools.py, Evaluate.start): NMS re-run for each m at
  threshold m - 0.05, so each IoU level gets its own suppression; compare numbers within a protocol.

As in both references, NMS suppresses a candidate whose IoU with a kept one is > the threshold.
Equal scores (common with Hamming scores) rank the lower candidate index first, so results are
deterministic. IoU here is exact; the reference adds 1e-7 to the union, which only matters for an
IoU exactly equal to m.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from pipeline.spans import as_spans as _spans
from pipeline.spans import ground_truth_iou, temporal_iou

PER_IOU = "per-iou"
Nms = float | Literal["per-iou"] | None


def _scored(scores: ArrayLike, spans: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores, spans = np.asarray(scores, dtype=np.float64), _spans(spans, "spans")
    if scores.ndim != 2 or spans.shape != (scores.shape[1], 2):
        raise ValueError(f"scores must be [Q, N] and spans [N, 2], got {scores.shape} and {spans.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, spans


def top_candidates(scores: ArrayLike, spans: ArrayLike, n: int, nms_threshold: float | None) -> np.ndarray:
    """[Q, n] indices of the n best candidates per query after greedy NMS; -1 where fewer survive.

    Greedy NMS keeps the best remaining candidate and drops those overlapping it by more than the
    threshold; run for all queries at once, n rounds, never an N x N IoU matrix. None means no NMS.
    """
    scores, spans = _scored(scores, spans)
    rows = np.arange(len(scores))
    open_ = np.ones(scores.shape, dtype=bool)
    picks = np.full((len(scores), n), -1, dtype=np.int64)
    for k in range(min(n, scores.shape[1])):
        best = np.where(open_, scores, -np.inf).argmax(axis=1)
        live = open_[rows, best]
        picks[live, k] = best[live]
        if nms_threshold is not None:
            open_ &= temporal_iou(spans[best], spans) <= nms_threshold
        open_[rows, best] = False
    return picks


def _check(ns: Sequence[int], ious: Sequence[float], nms: Nms) -> None:
    if not ns or any(int(n) != n or n < 1 for n in ns):
        raise ValueError(f"ns must be positive integers, got {ns!r}")
    if not ious or any(not 0 < m <= 1 for m in ious):
        raise ValueError(f"ious must lie in (0, 1], got {ious!r}")
    if not (nms is None or nms == PER_IOU or (isinstance(nms, (int, float)) and 0 <= nms <= 1)):
        raise ValueError(f"nms must be a threshold in [0, 1], {PER_IOU!r} or None, got {nms!r}")


def recall_hits(scores: ArrayLike, spans: ArrayLike, ground_truth: Sequence[ArrayLike], *,
                ns: Sequence[int] = (1, 5), ious: Sequence[float] = (0.3, 0.5, 0.7),
                nms: Nms = PER_IOU) -> dict[str, np.ndarray]:
    """Per-query hits [Q] (bool) for every "R@n,IoU=m"; pool them over videos with mean_recall.

    ``scores`` [Q, N] rates the candidates ``spans`` [N, 2] (seconds) for each of Q queries.
    """
    _check(ns, ious, nms)
    scores, spans = _scored(scores, spans)
    overlap = ground_truth_iou(spans, ground_truth)
    if len(overlap) != len(scores):
        raise ValueError(f"{len(scores)} rows of scores but ground truth for {len(overlap)} queries")
    picks: dict[float | None, np.ndarray] = {}
    best = {}
    for m in ious:
        threshold = m - 0.05 if nms == PER_IOU else nms
        if threshold not in picks:
            picks[threshold] = top_candidates(scores, spans, max(ns), threshold)
        top = picks[threshold]
        best[m] = np.where(top >= 0, np.take_along_axis(overlap, top.clip(min=0), axis=1), 0.0)
    return {f"R@{n},IoU={m:g}": (best[m][:, :n] >= m).any(axis=1) for n in ns for m in ious}


def mean_recall(hits: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Recall over all queries of several recall_hits results (one per video)."""
    pooled: dict[str, list[np.ndarray]] = {}
    for part in hits:
        for key, value in part.items():
            pooled.setdefault(key, []).append(value)
    total = {key: np.concatenate(parts) for key, parts in pooled.items()}
    if not total or len(next(iter(total.values()))) == 0:
        raise ValueError("no queries to compute recall over")
    return {key: float(value.mean()) for key, value in total.items()}


def recall_at(scores: ArrayLike, spans: ArrayLike, ground_truth: Sequence[ArrayLike], *,
              ns: Sequence[int] = (1, 5), ious: Sequence[float] = (0.3, 0.5, 0.7),
              nms: Nms = PER_IOU) -> dict[str, float]:
    """{"R@1,IoU=0.3": 0.42, ...} for one candidate set; see recall_hits."""
    return mean_recall([recall_hits(scores, spans, ground_truth, ns=ns, ious=ious, nms=nms)])


def random_scores(num_queries: int, num_candidates: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Uniform random scores: the chance-level ranking every model must beat, reproducible by seed."""
    return np.random.default_rng(seed).random((num_queries, num_candidates))
