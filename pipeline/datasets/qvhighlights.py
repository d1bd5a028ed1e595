"""QVHighlights: JSON lines of ``qid``, ``query``, ``vid``, ``duration``, ``relevant_windows`` (seconds).

A query may have several relevant windows; all are kept as its ground truth. Queries are grouped
by ``vid`` in order of first appearance; ``qid`` becomes Annotation.query_id.
"""

from __future__ import annotations

import json
from pathlib import Path

from .annotations import (Annotation, AnnotationError, Video, clip_span, field, number, pair, positive, reporting,
                          sentence)


def _parse_line(text: str) -> tuple[str, float, Annotation]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    video_id, duration = str(field(entry, "vid")), positive(field(entry, "duration"), "duration")
    windows = field(entry, "relevant_windows")
    if not isinstance(windows, list) or not windows:
        raise ValueError(f"'relevant_windows' must be a non-empty list, got {windows!r}")
    spans = []
    for i, window in enumerate(windows):
        start, end = pair(window, f"relevant_windows[{i}]")
        spans.append(clip_span(number(start, "start"), number(end, "end"), duration))
    return video_id, duration, Annotation(sentence(field(entry, "query")), tuple(spans), field(entry, "qid"))


def load_qvhighlights(path: str | Path, *, errors: list[AnnotationError] | None = None) -> list[Video]:
    """Read a QVHighlights split with ground truth (train or val; the test split has no windows)."""
    durations: dict[str, float] = {}
    queries: dict[str, list[Annotation]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                with reporting(errors, path, line=line_no):
                    video_id, duration, annotation = _parse_line(text)
                    if durations.setdefault(video_id, duration) != duration:
                        raise ValueError(f"video {video_id!r} has duration {duration:g} here, "
                                         f"{durations[video_id]:g} on an earlier line")
                    queries.setdefault(video_id, []).append(annotation)
    return [Video(video_id, durations[video_id], tuple(annotations)) for video_id, annotations in queries.items()]
