"""Alert quality: what a checkpoint's standing queries fire on when every video of a split streams live at once.

Ranking (evaluate.py) asks which moment of a video known to hold the answer is best. A standing query asks, on
every stream, all the time, whether its moment is happening now. This module answers that question the way the
service does: every video becomes a stream, the streams advance second by second together through the live encoder
(:class:`LiveCoder`), and every distinct sentence of the split is a standing query of the live matcher
(:class:`LiveMatcher`: range search, hit merging, settle window). Its events are then scored against the truth:

- an event is right when its stream holds a moment of the query's event (``Annotation.event``: the same label, so
  another phrasing of the same thing counts) with temporal IoU >= m; a second event on the same real moment is false;
- moment recall is the share of (query, stream, real moment) triples that a right event found;
- false events per stream-hour divide the false events of all queries by the hours streamed;
- delay is media seconds from a real moment's end to the second its event was published.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.spans import temporal_iou

IOUS = (0.5, 0.3)


@dataclass(frozen=True)
class Alert:
    """A match event as the simulation saw it: ``second`` is the stream second at which it was published."""

    query: str
    stream: str
    start: int
    end: int
    distance: int
    second: int


@dataclass(frozen=True)
class Truth:
    """The real moments of every query on every stream, and how long the streams ran."""

    moments: dict[tuple[str, str], np.ndarray]  # (query, stream) -> spans [n, 2]
    queries: tuple[str, ...]
    stream_seconds: float

    @classmethod
    def of(cls, samples: Sequence, extra_queries: Iterable[tuple[str, str]] = ()) -> Truth:
        """Every distinct sentence of ``samples`` is a query; ``extra_queries`` adds (sentence, event) pairs, e.g.
        captions that happen on none of the streams."""
        event_of: dict[str, str] = {}
        for sample in samples:
            for sentence, event in zip(sample.sentences, sample.kinds):
                event_of.setdefault(sentence, event)
        for sentence, event in extra_queries:
            event_of.setdefault(sentence, event)
        by_event: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for sample in samples:
            for event, spans in sample.event_spans().items():
                by_event[event].append((sample.video_id, spans))
        moments = {(query, stream): np.unique(spans, axis=0)
                   for query, event in event_of.items() for stream, spans in by_event.get(event, ())}
        return cls(moments, tuple(event_of), float(sum(len(sample.video) for sample in samples)))


def score_alerts(alerts: Sequence[Alert], truth: Truth, ious: Sequence[float] = IOUS) -> dict:
    """Event precision, moment recall, F1, false events per stream-hour and delays, at each IoU in ``ious``."""
    hours = truth.stream_seconds / 3600
    total = sum(len(spans) for spans in truth.moments.values())
    report = {"events": len(alerts), "moments": total, "queries": len(truth.queries),
              "stream_hours": round(hours, 4)}
    for iou in ious:
        found: set[tuple[str, str, int]] = set()
        right, delays = 0, []
        for alert in sorted(alerts, key=lambda a: (a.second, a.stream, a.query, a.start)):
            spans = truth.moments.get((alert.query, alert.stream))
            if spans is None:
                continue
            overlap = temporal_iou(np.array([[alert.start, alert.end]], np.float64), spans)[0]
            best = int(np.argmax(overlap))
            key = (alert.query, alert.stream, best)
            if overlap[best] >= iou and key not in found:
                found.add(key)
                right += 1
                delays.append(alert.second - spans[best, 1])
        precision = right / len(alerts) if alerts else 0.0
        recall = len(found) / total if total else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[f"IoU={iou:g}"] = {
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "right": right, "false": len(alerts) - right,
            "false_per_stream_hour": round((len(alerts) - right) / hours, 2) if hours else math.nan,
            "delay_p50": float(np.median(delays)) if delays else None,
            "delay_p90": float(np.percentile(delays, 90)) if delays else None,
        }
    return report


def stream_moments(model, samples: Sequence, model_id: str = "eval") -> list[list]:
    """The moment codes the live encoder emits when every sample streams at once, one list per stream second:
    second t's feature records of all streams go through :class:`LiveCoder` together, as one worker batch."""
    import torch

    from pipeline.bus.records import FrameFeatures
    from pipeline.codes.live import LiveCoder
    from pipeline.model.streaming import StreamingEncoder

    device = next(model.parameters()).device
    coder = LiveCoder(StreamingEncoder(model.eval(), device), bits=model.config.bits, model=model_id,
                      clock=lambda: 0.0)
    videos = [(s.video_id, s.video.detach().cpu().numpy()) for s in samples]
    rounds = []
    with torch.inference_mode():
        for t in range(max(len(v) for _, v in videos)):
            records = [FrameFeatures(vid, t, float(t), float(t), video[t], last=t == len(video) - 1)
                       for vid, video in videos if t < len(video)]
            moments, _ = coder.encode(records)
            rounds.append(moments)
    return rounds


def query_codes(model, sentences: Sequence[str], samples: Sequence, encode=None) -> np.ndarray:
    """Packed codes [Q, B/8] of sentences, as the query worker makes them (sentence encoder, QEN, sign); the
    samples' sentence vectors are used where they have the sentence, ``encode`` for the rest."""
    import torch

    from pipeline.codes.packing import pack_signs

    known = {text: vector for s in samples for text, vector in zip(s.sentences, s.sentence_vectors)}
    missing = [text for text in sentences if text not in known]
    if missing:
        if encode is None:
            raise ValueError(f"{len(missing)} queries are in no sample and there is no sentence encoder to encode them")
        device = samples[0].sentence_vectors.device
        known |= dict(zip(missing, torch.as_tensor(np.asarray(encode(missing), np.float32), device=device)))
    with torch.inference_mode():
        return pack_signs(model.qen(torch.stack([known[text] for text in sentences])))


def live_alerts(rounds: Sequence[Sequence], queries: Sequence[str], codes: np.ndarray, bits: int, threshold: int,
                *, settle: int, moments_per_second, model_id: str = "eval") -> list[Alert]:
    """The events of the live matcher over ``rounds`` (from ``stream_moments``) with every query at ``threshold``;
    a stream's open clusters are published with its last second's moments, as in the query worker."""
    from pipeline.bus.records import StandingQuery
    from pipeline.matching.live import LiveMatcher

    def no_text(texts):
        raise AssertionError("queries are registered with their codes")

    matcher = LiveMatcher(bits, model_id, no_text, settle=settle, moments_per_second=moments_per_second,
                          clock=lambda: 0.0)
    ids = {f"q{i}": text for i, text in enumerate(queries)}
    matcher.apply_queries([(qid, StandingQuery(qid, text, code, bits, threshold, 0.0, model_id))
                           for (qid, text), code in zip(ids.items(), codes)])
    alerts = []
    for t, moments in enumerate(rounds):
        events, _ = matcher.process(moments)
        alerts += [Alert(ids[e.query_id], e.stream_id, e.start, e.end, e.distance, t + 1) for e in events]
    return alerts


def alert_sweep(model, samples: Sequence, thresholds: Iterable[int], *, settle: int = 3,
                extra_queries: Iterable[tuple[str, str]] = (), encode=None, ious: Sequence[float] = IOUS,
                progress: bool = False) -> list[dict]:
    """``score_alerts`` at each threshold: one live encoding of all streams, one live matching per threshold.
    ``encode`` (sentences -> vectors) is needed only for ``extra_queries``."""
    from tqdm import tqdm

    from pipeline.model import moments_ending_at

    config = model.config
    truth = Truth.of(samples, extra_queries)
    rounds = stream_moments(model, samples)
    codes = query_codes(model, truth.queries, samples, encode)
    per_second = lambda second: moments_ending_at(second, config.kernel_sizes, config.strides)  # noqa: E731
    sweep = []
    for threshold in tqdm(list(thresholds), desc="thresholds", unit="threshold", disable=not progress):
        alerts = live_alerts(rounds, truth.queries, codes, config.bits, threshold, settle=settle,
                             moments_per_second=per_second)
        sweep.append({"threshold": threshold, **score_alerts(alerts, truth, ious)})
    return sweep


def best_threshold(sweep: Sequence[dict], iou: float = 0.5) -> dict:
    """The sweep entry with the highest F1 at ``iou``; ties go to the lower threshold, the more precise."""
    key = f"IoU={iou:g}"
    return max(sweep, key=lambda entry: (entry[key]["f1"], -entry["threshold"]))


CALIBRATION_RULE = "the Hamming threshold of highest alert F1 at IoU 0.5 on the validation split"
THRESHOLDS = range(2, 65, 2)


def calibrate(model, val_samples: Sequence, *, settle: int = 3, thresholds: Iterable[int] = THRESHOLDS) -> dict:
    """The checkpoint's threshold and what it measured on the validation split, for ``set_calibration``."""
    best = best_threshold(alert_sweep(model, val_samples, thresholds, settle=settle))
    return {"threshold": best["threshold"], "rule": CALIBRATION_RULE, "settle": settle,
            "videos": len(val_samples), "queries": best["queries"], **best["IoU=0.5"]}
