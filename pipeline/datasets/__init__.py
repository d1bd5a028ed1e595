"""Readers for the public moment-localization annotation formats, into one Video/Annotation shape.

    videos = load_dataset("activitynet", "val_1.json")            # strict: first bad entry raises
    errors = []
    videos = load_dataset("charades", "charades_sta_train.txt", errors=errors)   # lenient: bad lines skipped
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .annotations import Annotation, AnnotationError, Span, Video
from .captions import dump_activitynet, load_activitynet, load_tacos
from .charades import load_charades, read_durations
from .qvhighlights import load_qvhighlights

LOADERS: dict[str, Callable[..., list[Video]]] = {
    "charades": load_charades,
    "tacos": load_tacos,
    "activitynet": load_activitynet,
    "qvhighlights": load_qvhighlights,
}

__all__ = ["Annotation", "AnnotationError", "LOADERS", "Span", "Video", "dump_activitynet", "load_activitynet",
           "load_charades", "load_dataset", "load_qvhighlights", "load_tacos", "parse_dataset_spec", "read_durations"]


def _check_kind(kind: str) -> None:
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(LOADERS)}")


def load_dataset(kind: str, path: str | Path, **kw: Any) -> list[Video]:
    """Read ``path`` with the reader for ``kind``; ``kw`` goes to it (``errors=[]`` for lenient, ...)."""
    _check_kind(kind)
    return LOADERS[kind](path, **kw)


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """``"activitynet:/x/val.json"`` -> ("activitynet", Path("/x/val.json")); the path may itself hold colons."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"dataset {spec!r}: expected KIND:PATH with KIND one of {', '.join(LOADERS)}")
    _check_kind(kind)
    return kind, Path(path)
