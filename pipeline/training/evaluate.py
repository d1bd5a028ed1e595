"""How well a CMHN checkpoint localises moments: R@n at IoU m for hashed codes, relaxed codes and chance.

A sample is one video with all its sentences, the unit of both training and evaluation. Hashed scores are what the
service ranks by: sign codes packed to bytes, score = B - 2 * Hamming. Continuous scores are the relaxed codes the
loss trains (smooth_sign of the MLP outputs), h_s . h_v; the gap between the two is what binarisation costs.
Every recall is reported under two NMS protocols (pipeline/training/metrics.py): a fixed threshold, and the
reference's per-IoU threshold m - 0.05.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codes.packing import hamming, pack_signs, score
from pipeline.datasets import Video
from pipeline.model import CMHN, candidate_spans, smooth_sign
from pipeline.training.extract import FeatureError, FeatureSet
from pipeline.training.metrics import PER_IOU, mean_recall, random_scores, recall_hits

PER_IOU_LABEL = "nms=m-0.05"
Encode = Callable[[list[str]], np.ndarray]  # sentences -> sentence vectors [M, S]


def fixed_label(threshold: float) -> str:
    return f"nms={threshold:g}"


@dataclass(frozen=True)
class Sample:
    """One video's per-second features and its sentences, their vectors and ground-truth spans (seconds)."""

    video_id: str
    video: torch.Tensor  # float32 [T, V]
    sentences: tuple[str, ...]
    sentence_vectors: torch.Tensor  # float32 [M, S]
    ground_truth: tuple[np.ndarray, ...]  # per sentence [g, 2]
    events: tuple[str, ...] = ()  # per sentence, Annotation.event; empty: each sentence is only itself

    @property
    def kinds(self) -> tuple[str, ...]:
        """What each sentence is the same thing as in other videos."""
        return self.events or self.sentences

    def event_spans(self) -> dict[str, np.ndarray]:
        """Every event of the video and its spans [g, 2], over all sentences that describe it."""
        spans: dict[str, list[np.ndarray]] = {}
        for event, truth in zip(self.kinds, self.ground_truth):
            spans.setdefault(event, []).append(truth)
        return {event: np.concatenate(parts) for event, parts in spans.items()}


def build_samples(videos: Sequence[Video], features: FeatureSet, encode: Encode, device: torch.device) -> list[Sample]:
    """Pair annotations with their features; every sentence is encoded in one batch (the encoder caches)."""
    missing = [v.video_id for v in videos if v.video_id not in features.videos]
    if missing:
        raise FeatureError(f"{features.root} has no features for {len(missing)} annotated videos, e.g. {missing[:3]}")
    texts = [a.sentence for v in videos for a in v.annotations]
    vectors = torch.as_tensor(np.asarray(encode(texts), dtype=np.float32))
    samples, start = [], 0
    for video in videos:
        feats = features.load(video.video_id)
        if abs(len(feats) - math.ceil(video.duration)) > 1:
            raise FeatureError(
                f"features of {video.video_id} cover {len(feats)} s but the annotation says {video.duration:g} s: "
                f"were {features.root} extracted from other videos?"
            )
        count = len(video.annotations)
        samples.append(Sample(
            video.video_id,
            torch.from_numpy(feats).to(device),
            tuple(a.sentence for a in video.annotations),
            vectors[start : start + count].to(device),
            tuple(np.asarray(a.spans, dtype=np.float64) for a in video.annotations),
            tuple(a.event for a in video.annotations),
        ))  # fmt: skip
        start += count
    return samples


@torch.inference_mode()
def score_video(model: CMHN, sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate spans [N, 2] and the hashed and continuous scores [M, N] of each sentence against each."""
    config = model.config
    spans = candidate_spans(len(sample.video), config.kernel_sizes, config.strides)
    video, query = model.ven(sample.video), model.qen(sample.sentence_vectors)
    hashed = score(hamming(pack_signs(query), pack_signs(video)), config.bits)
    continuous = (smooth_sign(query) @ smooth_sign(video).T).cpu().numpy()
    return spans, hashed, continuous


def evaluate(
    model: CMHN,
    samples: Sequence[Sample],
    *,
    ns: Sequence[int] = (1, 5),
    ious: Sequence[float] = (0.3, 0.5, 0.7),
    nms: float = 0.5,
    random_draws: int = 10,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """{scoring: {protocol: {"R@n,IoU=m": recall}}} for scoring hashed, continuous and (with random_draws > 0)
    random, each under a fixed NMS threshold (fixed_label(nms)) and the reference's per-IoU NMS (PER_IOU_LABEL).
    The random baseline pools random_draws seeded uniform rankings of every query."""
    if not samples:
        raise ValueError("no samples to evaluate")
    protocols = {fixed_label(nms): nms, PER_IOU_LABEL: PER_IOU}
    hits: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
    rng = np.random.default_rng(seed)
    model.eval()
    for sample in samples:
        spans, hashed, continuous = score_video(model, sample)
        rankings = {"hashed": [hashed], "continuous": [continuous]}
        if random_draws:
            rankings["random"] = [random_scores(*hashed.shape, rng) for _ in range(random_draws)]
        for scoring, draws in rankings.items():
            for label, protocol in protocols.items():
                hits.setdefault((scoring, label), []).extend(
                    recall_hits(s, spans, sample.ground_truth, ns=ns, ious=ious, nms=protocol) for s in draws
                )
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (scoring, label), parts in hits.items():
        table.setdefault(scoring, {})[label] = mean_recall(parts)
    return table


def hashed_recall(model: CMHN, samples: Sequence[Sample], n: int = 1, iou: float = 0.5) -> float:
    """R@n at IoU m of the hashed codes (fixed NMS 0.5): the validation score training selects checkpoints by."""
    table = evaluate(model, samples, ns=(n,), ious=(iou,), random_draws=0)
    return table["hashed"][fixed_label(0.5)][f"R@{n},IoU={iou:g}"]


@torch.inference_mode()
def time_queries(model: CMHN, samples: Sequence[Sample], encode: Encode) -> dict[str, float]:
    """Milliseconds per query of the query side, one query at a time as the query worker serves them: sentence
    encoding (uncached), QEN, sign and packing, then Hamming ranking of the video's candidate codes."""
    model.eval()
    stages = []
    for sample in samples:
        moments = pack_signs(model.ven(sample.video))  # the moment side, computed before the queries arrive
        if not stages and sample.sentences:  # warm-up: a lazily loaded encoder must not be timed loading
            _query_stages(model, encode, sample.sentences[0], moments)
        stages += [_query_stages(model, encode, sentence, moments) for sentence in sample.sentences]
    if not stages:
        raise ValueError("no queries to time")
    ms = np.asarray(stages) * 1e3
    total = ms.sum(axis=1)
    return {
        "queries": len(total),
        "mean": float(total.mean()),
        "p50": float(np.percentile(total, 50)),
        "p95": float(np.percentile(total, 95)),
        "encode_mean": float(ms[:, 0].mean()),
        "qen_sign_mean": float(ms[:, 1].mean()),
        "hamming_rank_mean": float(ms[:, 2].mean()),
    }


def _query_stages(model: CMHN, encode: Encode, sentence: str, moments: np.ndarray) -> tuple[float, float, float]:
    """Seconds spent encoding one query, coding it, and ranking the packed moment codes by Hamming distance."""
    t0 = time.perf_counter()
    vector = torch.as_tensor(np.asarray(encode([sentence]), dtype=np.float32), device=next(model.parameters()).device)
    t1 = time.perf_counter()
    code = pack_signs(model.qen(vector))
    t2 = time.perf_counter()
    np.argsort(hamming(code, moments)[0], kind="stable")
    return t1 - t0, t2 - t1, time.perf_counter() - t2
