"""Recall metrics on hand-computed cases, and the vectorised NMS against a plain greedy loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.training.metrics import (PER_IOU, ground_truth_iou, mean_recall, random_scores, recall_at, recall_hits,
                                       temporal_iou, top_candidates)


def test_temporal_iou_by_hand():
    a = [[0, 10], [5, 15], [3, 3]]
    b = [[0, 10], [10, 20], [2, 4], [3, 3]]
    expected = [[1.0, 0.0, 0.2, 0.0],
                [5 / 15, 5 / 15, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0]]  # zero-length spans, even two equal ones, overlap nothing
    np.testing.assert_allclose(temporal_iou(a, b), expected)
    assert temporal_iou(np.zeros((7, 3, 2)), np.zeros((5, 2))).shape == (7, 3, 5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        temporal_iou([[0, 1, 2]], [[0, 1]])


def test_ground_truth_iou_takes_best_of_several_spans():
    spans = [[0, 10], [20, 30]]
    got = ground_truth_iou(spans, [(0, 5), [[25, 30], [0, 20]], [[20, 30]]])
    np.testing.assert_allclose(got, [[0.5, 0.0], [0.5, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="ground truth of query 1"):
        ground_truth_iou(spans, [(0, 5), []])


def naive_nms(scores: np.ndarray, spans: np.ndarray, n: int, threshold: float | None) -> list[int]:
    """The CMHN reference's loop: walk candidates best-first, keep one unless it overlaps a kept one too much."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if threshold is None or all(temporal_iou(spans[[k]], spans[[i]])[0, 0] <= threshold for k in kept):
            kept.append(int(i))
        if len(kept) == n:
            break
    return kept + [-1] * (n - len(kept))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 6), st.sampled_from([None, 0.0, 0.3, 0.5, 0.95]),
       st.integers(0, 2**32 - 1))
def test_top_candidates_matches_greedy_loop(q, n_candidates, n, threshold, seed):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 10, n_candidates)
    spans = np.stack([start, start + rng.integers(0, 6, n_candidates)], axis=1).astype(float)  # some zero-length
    scores = rng.integers(-3, 4, (q, n_candidates)).astype(float)  # few values: many ties, as Hamming scores have
    got = top_candidates(scores, spans, n, threshold)
    assert got.tolist() == [naive_nms(row, spans, n, threshold) for row in scores]


def test_top_candidates_pads_when_nms_leaves_too_few():
    spans = [[0, 10], [0, 10], [1, 10]]
    assert top_candidates([[1.0, 3.0, 2.0]], spans, 3, 0.5).tolist() == [[1, -1, -1]]
    assert top_candidates([[1.0, 3.0, 2.0]], spans, 3, None).tolist() == [[1, 2, 0]]


# Hand case: c0 scores best but misses; c1 sits inside c0 (IoU 0.475); c2 is the ground truth.
SPANS = [[0, 10], [0, 4.75], [20, 30]]
SCORES = [[0.9, 0.8, 0.7]]
TRUTH = [[20, 30]]


def test_nms_changes_the_answer():
    """Without NMS c0 and c1 fill the top 2; NMS at 0.4 drops c1, so c2 gets in."""
    assert recall_at(SCORES, SPANS, TRUTH, ns=(2,), ious=(0.5,), nms=None) == {"R@2,IoU=0.5": 0.0}
    assert recall_at(SCORES, SPANS, TRUTH, ns=(2,), ious=(0.5,), nms=0.4) == {"R@2,IoU=0.5": 1.0}


def test_per_iou_nms_differs_from_fixed():
    """Fixed 0.5 keeps c1 (0.475 <= 0.5) for every m; per-IoU suppresses it at m - 0.05 = 0.25 and 0.45, not 0.65."""
    fixed = recall_at(SCORES, SPANS, TRUTH, ns=(1, 2, 3), nms=0.5)
    per_iou = recall_at(SCORES, SPANS, TRUTH, ns=(1, 2, 3), nms=PER_IOU)
    assert list(per_iou) == ["R@1,IoU=0.3", "R@1,IoU=0.5", "R@1,IoU=0.7", "R@2,IoU=0.3", "R@2,IoU=0.5",
                             "R@2,IoU=0.7", "R@3,IoU=0.3", "R@3,IoU=0.5", "R@3,IoU=0.7"]
    assert [fixed[f"R@2,IoU={m}"] for m in (0.3, 0.5, 0.7)] == [0.0, 0.0, 0.0]
    assert [per_iou[f"R@2,IoU={m}"] for m in (0.3, 0.5, 0.7)] == [1.0, 1.0, 0.0]
    assert all(fixed[f"R@1,IoU={m}"] == per_iou[f"R@1,IoU={m}"] == 0.0 for m in (0.3, 0.5, 0.7))
    assert all(fixed[f"R@3,IoU={m}"] == per_iou[f"R@3,IoU={m}"] == 1.0 for m in (0.3, 0.5, 0.7))


def test_hit_needs_iou_at_least_m_with_any_ground_truth():
    spans = [[0, 4], [10, 20]]
    truth = [[[0, 8], [30, 40]],  # c0 overlaps the first span with IoU exactly 0.5
             [[30, 40], [12, 20]]]  # c1 overlaps the second with IoU 0.8
    hits = recall_hits([[2.0, 1.0], [1.0, 2.0]], spans, truth, ns=(1,), ious=(0.5, 0.7, 0.9), nms=0.5)
    assert {k: v.tolist() for k, v in hits.items()} == {"R@1,IoU=0.5": [True, True], "R@1,IoU=0.7": [False, True],
                                                        "R@1,IoU=0.9": [False, False]}


def test_mean_recall_weights_every_query_once():
    video_a = recall_hits([[1.0, 0.0]], [[0, 1], [1, 2]], [(0, 1)], ns=(1,), ious=(0.5,))
    video_b = recall_hits([[1.0, 0.0]] * 3, [[0, 1], [1, 2]], [(1, 2)] * 3, ns=(1,), ious=(0.5,))
    assert mean_recall([video_a, video_b]) == {"R@1,IoU=0.5": 0.25}
    with pytest.raises(ValueError, match="no queries"):
        mean_recall([])


def test_random_baseline_is_seeded_and_at_chance():
    assert np.array_equal(random_scores(3, 5, seed=7), random_scores(3, 5, seed=7))
    assert not np.array_equal(random_scores(3, 5, seed=7), random_scores(3, 5, seed=8))
    spans = np.stack([np.arange(100), np.arange(1, 101)], axis=1)  # 100 disjoint one-second candidates
    truth = [spans[q % 100] for q in range(4000)]
    recall = recall_at(random_scores(4000, 100, seed=0), spans, truth, ns=(1, 5), ious=(0.5,), nms=None)
    assert recall["R@1,IoU=0.5"] == pytest.approx(0.01, abs=0.005)
    assert recall["R@5,IoU=0.5"] == pytest.approx(0.05, abs=0.015)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ns=(0,)), "ns must be positive"),
    (dict(ious=(0.0,)), r"ious must lie in \(0, 1\]"),
    (dict(nms="sometimes"), "nms must be a threshold"),
    (dict(nms=1.5), "nms must be a threshold"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recall_at(SCORES, SPANS, TRUTH, **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"scores must be \[Q, N\] and spans \[N, 2\]"):
        recall_at([0.9, 0.8, 0.7], SPANS, TRUTH)
    with pytest.raises(ValueError, match="1 rows of scores but ground truth for 2 queries"):
        recall_at(SCORES, SPANS, TRUTH * 2)
    with pytest.raises(ValueError, match="finite"):
        recall_at([[0.9, np.nan, 0.7]], SPANS, TRUTH)
