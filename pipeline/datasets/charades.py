"""Charades-STA: ``VID START END##sentence`` a line, in seconds; durations live in Charades' own CSV."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

from .annotations import Annotation, AnnotationError, Video, clip_span, number, positive, reporting, sentence


def read_durations(path: str | Path) -> dict[str, float]:
    """Video id -> duration in seconds from a Charades metadata CSV (columns ``id`` and ``length``)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        missing = {"id", "length"} - set(rows.fieldnames or ())
        if missing:
            raise AnnotationError(path, f"missing column(s) {sorted(missing)}", line=1)
        durations = {}
        for row in rows:
            with reporting(None, path, line=rows.line_num):
                durations[row["id"]] = positive(row["length"], "length")
    return durations


def sibling_durations_csv(path: str | Path) -> Path | None:
    """``Charades_v1_<split>.csv`` next to ``charades_sta_<split>.txt``, as the public release lays them out."""
    path = Path(path)
    match = re.fullmatch(r"charades_sta_(\w+)\.txt", path.name, re.IGNORECASE)
    csv_path = match and path.with_name(f"Charades_v1_{match.group(1)}.csv")
    return csv_path if csv_path and csv_path.is_file() else None


def _parse_line(text: str) -> tuple[str, float, float, str]:
    head, sep, tail = text.partition("##")
    if not sep:
        raise ValueError("missing '##' between the span and the sentence")
    parts = head.split()
    if len(parts) != 3:
        raise ValueError(f"expected 'VIDEO START END' before '##', got {head.strip()!r}")
    return parts[0], number(parts[1], "start"), number(parts[2], "end"), sentence(tail)


def load_charades(path: str | Path, *, durations: Mapping[str, float] | str | Path | None = None,
                  errors: list[AnnotationError] | None = None) -> list[Video]:
    """Read a Charades-STA split.

    ``durations`` is a mapping or a Charades CSV; by default the sibling ``Charades_v1_<split>.csv``.
    A video without a known duration (the train CSV is not redistributed) gets its latest annotated
    end time, with one warning naming how many videos that affected.
    """
    if durations is None:
        durations = sibling_durations_csv(path) or {}
    if not isinstance(durations, Mapping):
        durations = read_durations(durations)
    rows: list[tuple[int, tuple[str, float, float, str] | ValueError]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                try:
                    rows.append((line_no, _parse_line(text)))
                except ValueError as exc:  # reported below, in line order with the span errors
                    rows.append((line_no, exc))
    latest_end: dict[str, float] = {}
    for _, row in rows:
        if not isinstance(row, ValueError):
            latest_end[row[0]] = max(latest_end.get(row[0], row[2]), row[2])
    guessed = [video_id for video_id in latest_end if video_id not in durations]
    if guessed:
        warnings.warn(f"{path}: no duration for {len(guessed)} of {len(latest_end)} videos (e.g. {guessed[:3]}); "
                      "using each one's latest annotated end time", stacklevel=2)
    duration = {video_id: durations.get(video_id, end) for video_id, end in latest_end.items()}
    annotations: dict[str, list[Annotation]] = {}
    for line_no, row in rows:
        with reporting(errors, path, line=line_no):
            if isinstance(row, ValueError):
                raise row
            video_id, start, end, query = row
            span = clip_span(start, end, duration[video_id])
            annotations.setdefault(video_id, []).append(Annotation(query, (span,)))
    return [Video(video_id, duration[video_id], tuple(found))
            for video_id, found in annotations.items()]
