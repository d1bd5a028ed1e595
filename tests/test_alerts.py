"""Alert quality: the metric on hand-made events, the live simulation on a real model, calibration stored in and read
from the checkpoint, and the threshold a query gets when it is registered without one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bus.records import InvalidQuery, StandingQuery
from pipeline.datasets import Annotation, Video
from pipeline.matching.live import LiveMatcher
from pipeline.model import build_cmhn, save_checkpoint
from pipeline.model.checkpoint import calibrated_threshold, set_calibration
from pipeline.training import alerts
from pipeline.training.alerts import Alert, Truth, alert_sweep, best_threshold, calibrate, score_alerts
from pipeline.training.evaluate import Sample


def sample(video_id: str, seconds: int, annotations: list[tuple[str, str, float, float]], dim: int = 8) -> Sample:
    """A video of ``seconds`` with (sentence, event, start, end) annotations and random features."""
    rng = np.random.default_rng(abs(hash(video_id)) % 2**32)
    return Sample(video_id, torch.from_numpy(rng.standard_normal((seconds, dim)).astype(np.float32)),
                  tuple(a[0] for a in annotations), torch.from_numpy(rng.standard_normal((len(annotations), 6))
                                                                   .astype(np.float32)),
                  tuple(np.array([[a[2], a[3]]]) for a in annotations), tuple(a[1] for a in annotations))


STREAMS = [
    sample("a", 3600, [("a red circle rises", "red circle up", 10, 20),
                       ("a blue star sinks", "blue star down", 30, 36)]),
    sample("b", 3600, [("the red disc rises", "red circle up", 100, 110)]),
    sample("c", 3600, [("a green box grows", "green square grow", 5, 9)]),
]


def test_truth_follows_events_not_phrasings() -> None:
    """As the demo builds it: annotated videos, plus a caption whose event happens on none of them."""
    videos = [Video(s.video_id, float(len(s.video)), tuple(Annotation(text, (tuple(truth[0]),), label=event)
                                                           for text, event, truth in zip(s.sentences, s.events,
                                                                                         s.ground_truth)))
              for s in STREAMS]
    truth = Truth.of(videos, extra_queries=[("a purple star shrinks", "purple star shrink")])
    assert Truth.of_samples(STREAMS).moments.keys() == truth.moments.keys()
    assert set(truth.queries) == {"a red circle rises", "a blue star sinks", "the red disc rises", "a green box grows",
                                  "a purple star shrinks"}
    # both phrasings of the red circle happen on a and b; the absent query nowhere
    assert set(truth.moments) == {("a red circle rises", "a"), ("a red circle rises", "b"), ("the red disc rises", "a"),
                                  ("the red disc rises", "b"), ("a blue star sinks", "a"), ("a green box grows", "c")}
    assert truth.stream_seconds == 3 * 3600


def test_score_counts_doubles_wrong_streams_and_other_phrasings() -> None:
    truth = Truth.of_samples(STREAMS)
    alerts = [
        Alert("a red circle rises", "a", 10, 20, 5, 23),  # right
        Alert("a red circle rises", "a", 11, 19, 6, 24),  # the same real moment again: false
        Alert("a red circle rises", "b", 100, 110, 7, 113),  # the same event on another stream: right
        Alert("a red circle rises", "c", 5, 9, 8, 12),  # a stream without the event: false
        Alert("a blue star sinks", "a", 10, 20, 9, 23),  # the stream has the event, elsewhere: false
        Alert("a green box grows", "c", 6, 9, 3, 12),  # IoU 0.75: right at 0.5 and 0.3
    ]
    report = score_alerts(alerts, truth, ious=(0.5, 0.3))
    at = report["IoU=0.5"]
    assert (report["events"], report["moments"]) == (6, 6)  # moments: 2 + 2 (two phrasings x two streams) + 1 + 1
    assert (at["right"], at["false"]) == (3, 3)
    assert at["precision"] == 0.5 and at["recall"] == 0.5
    assert at["f1"] == pytest.approx(0.5)
    assert at["false_per_stream_hour"] == 1.0  # 3 false events in 3 stream-hours
    assert at["delay_p50"] == 3.0  # 23 - 20, 113 - 110, 12 - 9
    assert report["IoU=0.3"]["right"] == 3


def test_a_loose_event_is_right_only_at_the_lower_iou() -> None:
    truth = Truth.of_samples(STREAMS)
    report = score_alerts([Alert("a green box grows", "c", 5, 14, 3, 16)], truth, ious=(0.5, 0.3))  # IoU 4/9
    assert report["IoU=0.5"]["right"] == 0 and report["IoU=0.3"]["right"] == 1


def test_sweep_runs_the_live_logic_and_calibration_is_stored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_cmhn("lite", video_dim=8, sentence_dim=6, bits=32).eval()
    streams = [sample("a", 40, [("x", "x", 3, 9), ("y", "y", 20, 30)]), sample("b", 30, [("x", "x", 12, 20)])]
    sweep = alert_sweep(model, streams, [0, 8, 16, 32], settle=3)
    assert [entry["threshold"] for entry in sweep] == [0, 8, 16, 32]
    events = [entry["events"] for entry in sweep]
    assert events == sorted(events) and events[-1] > 0  # a larger radius can only add hits
    assert sweep[-1]["queries"] == 2 and sweep[-1]["moments"] == 3
    assert best_threshold(sweep) in sweep

    checkpoint = save_checkpoint(tmp_path / "model", model, {"backbone": "test"}, "test-encoder")
    assert calibrated_threshold(checkpoint) is None
    calibration = calibrate(model, streams, thresholds=[0, 8, 16, 32])
    set_calibration(checkpoint, calibration)
    assert calibrated_threshold(checkpoint) == calibration["threshold"]
    stored = json.loads((checkpoint / "config.json").read_text())
    assert stored["calibration"]["rule"] and stored["calibration"]["videos"] == 2


def test_a_sweep_with_patience_stops_past_its_peak(monkeypatch) -> None:
    f1s = iter([0.0, 0.2, 0.5, 0.4, 0.5, 0.3, 0.2, 0.9])  # a dip, the peak matched, then two below: stop there
    monkeypatch.setattr(alerts, "live_alerts", lambda *args, **kwargs: [])
    monkeypatch.setattr(alerts, "score_alerts", lambda *args, **kwargs: {"IoU=0.5": {"f1": next(f1s)}})
    model = build_cmhn("lite", video_dim=8, sentence_dim=6, bits=32).eval()
    streams = [sample("a", 40, [("x", "x", 3, 9)])]
    sweep = alert_sweep(model, streams, range(8), patience=2)
    assert [entry["threshold"] for entry in sweep] == [0, 1, 2, 3, 4, 5, 6]
    assert best_threshold(sweep)["threshold"] == 2


def test_calibration_takes_the_most_precise_threshold_of_the_f1_plateau() -> None:
    def sweep(*f1s):
        return [{"threshold": t, "IoU=0.5": {"f1": f1}} for t, f1 in zip((22, 24, 26, 28), f1s)]

    assert best_threshold(sweep(0.68, 0.726, 0.728, 0.728))["threshold"] == 24  # within 0.01 of the best
    assert best_threshold(sweep(0.68, 0.71, 0.728, 0.72))["threshold"] == 26  # 0.018 below is not a tie
    assert best_threshold(sweep(0.68, 0.71, 0.728, 0.72), tie=0.0)["threshold"] == 26


def test_a_query_without_threshold_takes_the_models() -> None:
    code = np.zeros(4, np.uint8)
    matcher = LiveMatcher(32, "m", lambda texts: np.zeros((len(texts), 4), np.uint8), threshold=9)
    assert matcher.apply_queries([("q", StandingQuery("q", "text", None, 0, None, 0.0)),
                                  ("c", StandingQuery("c", None, code, 32, None, 0.0)),
                                  ("own", StandingQuery("own", "text", None, 0, 3, 0.0))]) == []
    assert [matcher.queries.get(q).threshold for q in ("q", "c", "own")] == [9, 9, 3]

    uncalibrated = LiveMatcher(32, "m", lambda texts: np.zeros((len(texts), 4), np.uint8))
    errors = uncalibrated.apply_queries([("q", StandingQuery("q", "text", None, 0, None, 0.0))])
    assert len(errors) == 1 and "no threshold" in errors[0].message and "q" not in uncalibrated.queries


def test_a_query_code_of_another_length_says_so() -> None:
    matcher = LiveMatcher(32, "m", lambda texts: np.zeros((len(texts), 4), np.uint8), threshold=9)
    errors = matcher.apply_queries([("q", StandingQuery("q", None, np.zeros(16, np.uint8), 128, None, 0.0))])
    assert len(errors) == 1 and "128-bit" in errors[0].message and "32-bit" in errors[0].message


def test_record_threshold_is_optional_but_checked() -> None:
    assert StandingQuery("q", "text", None, 0, None, 0.0).threshold is None
    with pytest.raises(InvalidQuery):
        StandingQuery("q", "text", None, 0, -1, 0.0)


def test_query_add_takes_the_checkpoints_threshold(kafka_bootstrap: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Integration, real broker: `vmh query add` without --threshold writes the calibrated one; `query ls` shows it."""
    import uuid

    from pipeline.bus.topics import create_topics
    from pipeline.client import Client
    from workers.cli import main as vmh

    checkpoint = save_checkpoint(tmp_path / "model", build_cmhn("lite", bits=32), {"backbone": "test"}, "test")
    set_calibration(checkpoint, {"threshold": 17, "rule": "test"})
    prefix = f"alerts-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix)
    bus = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix]
    assert vmh(["query", "add", "a red circle rises", "--id", "calibrated", "--checkpoint", str(checkpoint), *bus]) == 0
    assert vmh(["query", "add", "a red circle rises", "--id", "explicit", "--threshold", "5", *bus]) == 0
    assert vmh(["query", "add", "a red circle rises", "--id", "worker-default", *bus]) == 0
    queries = Client(kafka_bootstrap, prefix).queries()
    assert {q: queries[q].threshold for q in queries} == {"calibrated": 17, "explicit": 5, "worker-default": None}
    capsys.readouterr()
    assert vmh(["query", "ls", "--checkpoint", str(checkpoint), *bus]) == 0
    listing = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert listing == {"calibrated": "threshold 17 bits", "explicit": "threshold 5 bits",
                       "worker-default": "threshold the model's (17 bits)"}
