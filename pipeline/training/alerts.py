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

from pipeline.datasets import Annotation, Video
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
    def of(cls, videos: Sequence[Video], extra_queries: Iterable[tuple[str, str]] = ()) -> Truth:
        """Every distinct sentence of ``videos`` is a query; ``extra_queries`` adds (sentence, event) pairs, e.g.
        captions that happen on none of the streams."""
        event_of: dict[str, str] = {}
        for video in videos:
            for annotation in video.annotations:
                event_of.setdefault(annotation.sentence, annotation.event)
        for sentence, event in extra_queries:
            event_of.setdefault(sentence, event)
        by_event: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for video in videos:
            for annotation in video.annotations:
                by_event[annotation.event][video.video_id] += annotation.spans
        moments = {(query, stream): np.unique(np.asarray(spans, np.float64), axis=0)
                   for query, event in event_of.items() for stream, spans in by_event.get(event, {}).items()}
        return cls(moments, tuple(event_of), float(sum(video.duration for video in videos)))

    @classmethod
    def of_samples(cls, samples: Sequence) -> Truth:
        """The same for training samples, whose videos last as many seconds as they have features."""
        videos = [Video(s.video_id, float(len(s.video)), tuple(
            Annotation(sentence, tuple(map(tuple, truth.tolist())), label=event)
            for sentence, event, truth in zip(s.sentences, s.kinds, s.ground_truth))) for s in samples]
        return cls.of(videos)

    @property
    def total(self) -> int:
        """(query, stream, real moment) triples: what moment recall divides by."""
        return sum(len(spans) for spans in self.moments.values())


class AlertJudge:
    """Marks alerts right or false in the order they arrive: right when the query's event happens on the stream
    with IoU >= ``iou`` and that real moment was not found before."""

    def __init__(self, truth: Truth, iou: float = 0.5) -> None:
        self.truth, self.iou = truth, iou
        self.found: set[tuple[str, str, int]] = set()
        self.right, self.false, self.delays = 0, 0, []

    def judge(self, alert: Alert) -> tuple[bool, float]:
        """(right, the alert's best IoU with the query's real moments on its stream)."""
        spans = self.truth.moments.get((alert.query, alert.stream))
        overlap = 0.0
        if spans is not None:
            ious = temporal_iou(np.array([[alert.start, alert.end]], np.float64), spans)[0]
            best = int(np.argmax(ious))
            overlap = float(ious[best])
            if overlap >= self.iou and (alert.query, alert.stream, best) not in self.found:
                self.found.add((alert.query, alert.stream, best))
                self.right += 1
                self.delays.append(alert.second - float(spans[best, 1]))
                return True, overlap
        self.false += 1
        return False, overlap

    def summary(self) -> dict:
        """Precision, recall, F1, false events per stream-hour and the delays of the right events so far."""
        events, hours = self.right + self.false, self.truth.stream_seconds / 3600
        precision = self.right / events if events else 0.0
        recall = len(self.found) / self.truth.total if self.truth.total else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "right": self.right, "false": self.false,
            "false_per_stream_hour": round(self.false / hours, 2) if hours else math.nan,
            "delay_p50": float(np.median(self.delays)) if self.delays else None,
            "delay_p90": float(np.percentile(self.delays, 90)) if self.delays else None,
        }


def score_alerts(alerts: Sequence[Alert], truth: Truth, ious: Sequence[float] = IOUS) -> dict:
    """Event precision, moment recall, F1, false events per stream-hour and delays, at each IoU in ``ious``."""
    report = {"events": len(alerts), "moments": truth.total, "queries": len(truth.queries),
              "stream_hours": round(truth.stream_seconds / 3600, 4)}
    ordered = sorted(alerts, key=lambda a: (a.second, a.stream, a.query, a.start))
    for iou in ious:
        judge = AlertJudge(truth, iou)
        for alert in ordered:
            judge.judge(alert)
        report[f"IoU={iou:g}"] = judge.summary()
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


def query_codes(model, sentences: Sequence[str], samples: Sequence) -> np.ndarray:
    """Packed codes [Q, B/8] of the samples' sentences, as the query worker makes them (sentence vectors, QEN,
    sign)."""
    import torch

    from pipeline.codes.packing import pack_signs

    known = {text: vector for s in samples for text, vector in zip(s.sentences, s.sentence_vectors)}
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
                ious: Sequence[float] = IOUS, progress: bool = False, patience: int | None = None) -> list[dict]:
    """``score_alerts`` at each threshold: one live encoding of all streams, one live matching per threshold.

    ``patience`` n stops the sweep after n thresholds in a row below its best F1 at IoU 0.5 so far (0.5 must be
    one of ``ious``). F1 rises to a peak and falls as false events flood in, and the flood is what makes the high
    thresholds slow: the sweeps of a 2-epoch training run spent nine tenths of their time past the peak."""
    from tqdm import tqdm

    from pipeline.model import moments_ending_at

    config = model.config
    truth = Truth.of_samples(samples)
    rounds = stream_moments(model, samples)
    codes = query_codes(model, truth.queries, samples)
    per_second = lambda second: moments_ending_at(second, config.kernel_sizes, config.strides)  # noqa: E731
    sweep, best, below = [], 0.0, 0
    for threshold in tqdm(sorted(thresholds), desc="thresholds", unit="threshold", disable=not progress):
        alerts = live_alerts(rounds, truth.queries, codes, config.bits, threshold, settle=settle,
                             moments_per_second=per_second)
        sweep.append({"threshold": threshold, **score_alerts(alerts, truth, ious)})
        if patience is not None:
            f1 = sweep[-1]["IoU=0.5"]["f1"]
            below = 0 if f1 >= best else below + 1
            best = max(best, f1)
            if below >= patience:
                break
    return sweep


F1_TIE = 0.01  # F1 this close to the best is a tie: 150-video splits of one recipe move by more


def best_threshold(sweep: Sequence[dict], iou: float = 0.5, tie: float = F1_TIE) -> dict:
    """The sweep entry of the lowest threshold whose F1 at ``iou`` is within ``tie`` of the highest.

    Near its peak F1 is flat, recall bought with precision one for one (the published model's validation split:
    0.726 to 0.729 from 24 to 28 bits while precision fell from 0.83 to 0.70), and there the more precise
    threshold is the one to serve: a false alert costs an operator more than a moment found a little less often."""
    key = f"IoU={iou:g}"
    best = max(entry[key]["f1"] for entry in sweep)
    return min((entry for entry in sweep if entry[key]["f1"] >= best - tie), key=lambda entry: entry["threshold"])


CALIBRATION_RULE = (f"the lowest Hamming threshold whose alert F1 at IoU 0.5 on the validation split is within {F1_TIE} "
                    "of the highest")


def thresholds_for(bits: int, points: int = 32) -> range:
    """Thresholds from near 0 to B/2 (orthogonal codes, IoU 0 by the loss's scale), ``points`` of them."""
    step = max(1, bits // (2 * points))
    return range(step, bits // 2 + 1, step)


CALIBRATION_PATIENCE = 3  # thresholds past the best F1 that calibration still tries


def calibrate(model, val_samples: Sequence, *, settle: int = 3, thresholds: Iterable[int] | None = None) -> dict:
    """The checkpoint's threshold and what it measured on the validation split, for ``set_calibration``; the sweep
    stops ``CALIBRATION_PATIENCE`` thresholds past its best."""
    thresholds = thresholds_for(model.config.bits) if thresholds is None else thresholds
    best = best_threshold(alert_sweep(model, val_samples, thresholds, settle=settle, patience=CALIBRATION_PATIENCE))
    return calibration_of(best, settle=settle, videos=len(val_samples))


def calibration_of(best: dict, *, settle: int, videos: int) -> dict:
    """What ``set_calibration`` stores of the sweep entry chosen on a split of ``videos`` videos."""
    return {"threshold": best["threshold"], "rule": CALIBRATION_RULE, "settle": settle, "videos": videos,
            "queries": best["queries"], **best["IoU=0.5"]}
