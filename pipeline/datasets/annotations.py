"""The one shape every moment-localization annotation format is read into.

A video has a duration and sentences; each sentence has one or more ground-truth spans in seconds,
clipped to [0, duration]. Readers are strict by default (the first malformed entry raises
AnnotationError naming file, line or entry, and what is wrong); given an ``errors`` list they are
lenient instead: each malformed entry is appended to it and skipped, as the reference code silently
skips reversed spans (Charades-STA train has four).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

Span = tuple[float, float]


@dataclass(frozen=True)
class Annotation:
    """A sentence and its ground truth. ``label`` names the kind of event it describes, where a dataset knows it
    (the synthetic one does): sentences with one label describe the same thing, so an alert for one is right
    wherever another occurs. Without a label a sentence is only the same event as itself."""

    sentence: str
    spans: tuple[Span, ...]
    query_id: int | str | None = None
    label: str | None = None

    @property
    def event(self) -> str:
        """What counts as the same event across videos: the label, else the sentence."""
        return self.label if self.label is not None else self.sentence


@dataclass(frozen=True)
class Video:
    video_id: str
    duration: float
    annotations: tuple[Annotation, ...]


class AnnotationError(ValueError):
    """A malformed annotation: ``path:line: message`` or ``path: where: message`` for JSON entries."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None, where: str | None = None):
        self.path, self.message, self.line, self.where = str(path), message, line, where
        location = f"{self.path}:{line}:" if line is not None else f"{self.path}:"
        super().__init__(f"{location} {where}: {message}" if where else f"{location} {message}")


@contextmanager
def reporting(errors: list[AnnotationError] | None, path: str | Path, *, line: int | None = None,
              where: str | None = None) -> Iterator[None]:
    """Turn a ValueError raised inside into an AnnotationError at this location; raise it, or collect it."""
    try:
        yield
    except ValueError as exc:
        error = exc if isinstance(exc, AnnotationError) else AnnotationError(path, str(exc), line=line, where=where)
        if errors is None:
            raise error from None
        errors.append(error)


def number(value: Any, what: str) -> float:
    """A finite float from a JSON number or a text token."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return x


def positive(value: Any, what: str) -> float:
    x = number(value, what)
    if x <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return x


def sentence(value: Any) -> str:
    """The sentence with surrounding whitespace removed (ActivityNet's start with a space)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"sentence must be a non-empty string, got {value!r}")
    return value.strip()


def field(entry: Any, name: str) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    if name not in entry:
        raise ValueError(f"missing field {name!r}")
    return entry[name]


def pair(value: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{what} must be a [start, end] pair, got {value!r}")
    return value[0], value[1]


def clip_span(start: float, end: float, duration: float) -> Span:
    """[start, end] clipped to the video; a reversed span or one outside the video is an error."""
    if not start < end:
        raise ValueError(f"span [{start:g}, {end:g}]: start is not before end")
    clipped = max(start, 0.0), min(end, duration)
    if not clipped[0] < clipped[1]:
        raise ValueError(f"span [{start:g}, {end:g}] lies outside the video [0, {duration:g}]")
    return clipped


def read_json(path: str | Path) -> Any:
    """A whole JSON file; a syntax error cannot be skipped, so it always raises."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
