"""ActivityNet Captions and TACoS: one JSON object, video id -> parallel ``timestamps`` and ``sentences``.

They differ only in units: ActivityNet gives ``duration`` and timestamps in seconds, TACoS gives
``num_frames``, ``fps`` and timestamps in frames. ActivityNet Captions is also the format the
project's own synthetic datasets are written in (dump_activitynet), with one extra optional key,
``labels`` (parallel to ``sentences``: the kind of event each describes); other keys are ignored and
video ids are free-form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .annotations import (Annotation, AnnotationError, Video, clip_span, field, number, pair, positive, read_json,
                          reporting, sentence)

# An entry's duration in seconds and its timestamps' units per second.
_Timebase = Callable[[Any], tuple[float, float]]


def _activitynet_timebase(entry: Any) -> tuple[float, float]:
    return positive(field(entry, "duration"), "duration"), 1.0


def _tacos_timebase(entry: Any) -> tuple[float, float]:
    fps = positive(field(entry, "fps"), "fps")
    return positive(field(entry, "num_frames"), "num_frames") / fps, fps


def _load(path: str | Path, timebase: _Timebase, errors: list[AnnotationError] | None) -> list[Video]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a JSON object of video id -> annotations, got {type(data).__name__}")
    videos = []
    for video_id, entry in data.items():
        with reporting(errors, path, where=f"video {video_id!r}"):
            duration, rate = timebase(entry)
            stamps, texts = field(entry, "timestamps"), field(entry, "sentences")
            labels = entry.get("labels", [None] * len(texts)) if isinstance(entry, dict) else None
            if not isinstance(stamps, list) or not isinstance(texts, list) or len(stamps) != len(texts):
                raise ValueError("'timestamps' and 'sentences' must be lists of the same length")
            if not isinstance(labels, list) or len(labels) != len(texts):
                raise ValueError("'labels' must be a list as long as 'sentences'")
            annotations = []
            for i, (stamp, text, label) in enumerate(zip(stamps, texts, labels)):
                with reporting(errors, path, where=f"video {video_id!r}, timestamps[{i}]"):
                    start, end = pair(stamp, "timestamp")
                    span = clip_span(number(start, "start") / rate, number(end, "end") / rate, duration)
                    if label is not None and not isinstance(label, str):
                        raise ValueError(f"label must be a string, got {label!r}")
                    annotations.append(Annotation(sentence(text), (span,), label=label))
            if annotations:
                videos.append(Video(video_id, duration, tuple(annotations)))
    return videos


def load_activitynet(path: str | Path, *, errors: list[AnnotationError] | None = None) -> list[Video]:
    """Read an ActivityNet Captions split (``train.json``, ``val_1.json``, ...)."""
    return _load(path, _activitynet_timebase, errors)


def load_tacos(path: str | Path, *, errors: list[AnnotationError] | None = None) -> list[Video]:
    """Read a TACoS split as redistributed with 2D-TAN; frame indices become seconds."""
    return _load(path, _tacos_timebase, errors)


def dump_activitynet(videos: Iterable[Video], path: str | Path) -> None:
    """Write videos as ActivityNet Captions JSON, which load_activitynet reads back unchanged.

    The format has one timestamp a sentence, so an annotation with several spans is refused.
    """
    data = {}
    for video in videos:
        bad = next((a for a in video.annotations if len(a.spans) != 1), None)
        if bad:
            raise ValueError(f"video {video.video_id!r}: ActivityNet Captions holds one span a sentence, "
                             f"{bad.sentence!r} has {len(bad.spans)}")
        data[video.video_id] = {"duration": video.duration,
                                "timestamps": [list(a.spans[0]) for a in video.annotations],
                                "sentences": [a.sentence for a in video.annotations]}
        if any(a.label is not None for a in video.annotations):
            data[video.video_id]["labels"] = [a.label for a in video.annotations]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
