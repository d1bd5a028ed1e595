"""Per-second video features for training, made by the producer's own frame path, stored one array per video.

A features directory holds ``<video_id>.npy`` (float16 [T, V], one row per second) and ``manifest.json``: the
extractor's identity (backbone, weights, frame size, sample rate) and the seconds of every video written so far.
Extraction is resumable: each array is written as ``.part`` and renamed, so an existing ``.npy`` is complete and is
skipped; a directory made by another extractor is refused, since its features would mean something else. A video
that cannot be decoded is reported and left out; the others are extracted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.features import complete_identity

if TYPE_CHECKING:
    from pipeline.features.backbone import FrameEncoder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vmh-features"
VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".flv")


class FeatureError(Exception):
    """A features directory or file that is missing, damaged or does not fit what is asked of it."""


class ExtractorMismatch(FeatureError):
    """A features directory made by a different extractor than the one asked for."""


@dataclass
class FeatureSet:
    """A features directory: its extractor identity and the seconds of each video it holds."""

    root: Path
    extractor: dict[str, Any]
    videos: dict[str, int]  # video id -> seconds

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureSet:
        root = Path(root)
        manifest = _read_manifest(root)
        if manifest is None:
            raise FeatureError(f"{root} is not a features directory (no {MANIFEST}); make one with `vmh extract`")
        return cls(root, complete_identity(manifest["extractor"]), manifest["videos"])

    def load(self, video_id: str) -> np.ndarray:
        """float32 [T, V] per-second features of one video."""
        if video_id not in self.videos:
            raise FeatureError(f"{self.root} has no features for video {video_id!r}")
        path = self.root / f"{video_id}.npy"
        try:
            array = np.load(path)
        except (OSError, ValueError) as error:
            raise FeatureError(f"cannot read features {path}: {error}") from error
        expected = (self.videos[video_id], self.extractor["dim"])
        if array.shape != expected:
            raise FeatureError(f"features {path} have shape {array.shape}, the manifest says {expected}")
        return array.astype(np.float32)

    def save(self) -> None:
        """Write the manifest atomically."""
        manifest = {"format": FORMAT, "version": VERSION, "extractor": self.extractor, "videos": self.videos}
        text = json.dumps(manifest, indent=1)
        temporary = self.root / (MANIFEST + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.root / MANIFEST)


@dataclass(frozen=True)
class ExtractResult:
    features: FeatureSet
    extracted: list[str]  # video ids computed in this run
    skipped: list[str]  # video ids already there
    failed: dict[str, str]  # video id -> why it could not be decoded; not in the features


def list_videos(videos_dir: str | os.PathLike) -> dict[str, Path]:
    """video id (file stem) -> path of every video file directly in videos_dir, sorted by id."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise FeatureError(f"{videos_dir} is not a directory of videos")
    found: dict[str, Path] = {}
    for path in sorted(videos_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            if path.stem in found:
                raise FeatureError(f"two videos share the id {path.stem!r}: {found[path.stem].name} and {path.name}")
            found[path.stem] = path
    if not found:
        raise FeatureError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {videos_dir}")
    return found


def open_for(out_dir: str | os.PathLike, extractor: Mapping[str, Any]) -> FeatureSet:
    """The features directory for this extractor: created, or an existing one made by the same extractor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        features = FeatureSet(out_dir, dict(extractor), {})
        features.save()
        return features
    saved = complete_identity(manifest["extractor"])
    differs = [f"{k}: {saved.get(k)!r} there, {extractor.get(k)!r} now" for k in sorted({*saved, *extractor})
               if saved.get(k) != extractor.get(k)]  # fmt: skip
    if differs:
        raise ExtractorMismatch(f"{out_dir} holds features of another extractor ({'; '.join(differs)}); "
                                "extract into another directory")  # fmt: skip
    return FeatureSet(out_dir, saved, manifest["videos"])


def extract_features(
    videos_dir: str | os.PathLike, out_dir: str | os.PathLike, encoder: FrameEncoder, *, progress: bool = True
) -> ExtractResult:
    """Extract every video in videos_dir that out_dir does not hold yet, through the producer's frame path."""
    from tqdm import tqdm

    from pipeline.features import video_features
    from pipeline.video.source import SourceError

    videos = list_videos(videos_dir)
    features = open_for(out_dir, encoder.identity())
    written = {vid: _seconds_written(features, vid) for vid in videos}
    skipped = [vid for vid, seconds in written.items() if seconds]
    todo = [vid for vid, seconds in written.items() if not seconds]
    kept = {vid: seconds for vid, seconds in features.videos.items() if vid not in todo}  # other folders' too
    features.videos = kept | {vid: written[vid] for vid in skipped}
    features.save()
    failed: dict[str, str] = {}
    with tqdm(todo, desc="extracting", unit="video", disable=not progress) as bar:
        for vid in bar:
            try:
                array = video_features(videos[vid], encoder)
            except SourceError as e:  # one corrupt file does not cost the rest of the folder
                log.error("video %s not extracted: %s", vid, e)
                failed[vid] = str(e)
                continue
            _write(features.root / f"{vid}.npy", array)
            features.videos[vid] = len(array)
            features.save()
    return ExtractResult(features, [vid for vid in todo if vid not in failed], skipped, failed)


def _seconds_written(features: FeatureSet, video_id: str) -> int:
    """Seconds in the video's .npy, 0 when there is none. An .npy only ever appears by renaming a finished .part,
    so one that parses is whole."""
    path = features.root / f"{video_id}.npy"
    if not path.is_file():
        return 0
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        log.warning("re-extracting %s: unreadable %s", video_id, path)
        return 0
    return len(array) if array.ndim == 2 and array.shape[1] == features.extractor["dim"] else 0


def _write(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as f:
        np.save(f, np.asarray(array, dtype=np.float16))
    os.replace(partial, path)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise FeatureError(f"corrupt features manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise FeatureError(f"{path} is not a version {VERSION} {FORMAT} manifest")
    return manifest
