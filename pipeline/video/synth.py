"""A synthetic moment-localization dataset with exact ground truth, rendered as real H.264 files.

Coloured shapes appear, move left/right/up/down or grow/shrink, and disappear; each such event is one ground-truth
moment [start, end) in seconds, on the frame grid, with several captions ("a red circle moves to the left", "the
red disc slides left", ...). Shapes are large and saturated on a near-neutral grey, so the signal is learnable by a
small temporal model on ImageNet frame features, and checkable by colour in decoded frames.

Generator version 2 (the default) makes a caption's every word count: the events of a video share colours, shapes
and actions with one another (a red circle rising beside a red square rising and a blue square sinking), so neither
training nor a standing query can get by on colour alone. Version 1, whose events all differ in colour, stays
reproducible with ``generator_version=1``. Every annotation carries its event's label ("red circle up").

``build_dataset`` writes ``videos/<video_id>.mp4``, ActivityNet Captions style ``train.json``, ``val.json`` and
``test.json`` ({video_id: {"duration", "timestamps", "sentences"}}) and, last, ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.datasets import Annotation, Video, dump_activitynet

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
GENERATOR_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 190),
}
NOUNS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "square block"),
    "triangle": ("triangle", "triangular shape", "three-sided shape"),
    "star": ("star", "star shape", "five-pointed star"),
}
VERBS: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "slides left", "travels leftwards"),
    "right": ("moves to the right", "slides right", "travels rightwards"),
    "up": ("moves up", "rises", "travels upwards"),
    "down": ("moves down", "sinks", "travels downwards"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller", "contracts"),
}
PHRASINGS = min(map(len, NOUNS.values())) * min(map(len, VERBS.values()))  # captions every event has at least
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_COS72 = math.cos(math.radians(72))
_STAR_ANGLES = -math.pi / 2 + 2 * math.pi * np.arange(5) / 5


class SynthError(ValueError):
    """Bad synthetic-dataset parameters, or an output directory holding a different dataset."""


@dataclass(frozen=True)
class Event:
    """One shape's life: visible for start <= t < end (seconds on the frame grid), interpolating centre and size.

    Centres (x, y) and sizes (bounding side) are fractions of the frame side, so an event renders at any size.
    """

    shape: str
    colour: str
    action: str
    start: float
    end: float
    centre0: tuple[float, float]
    centre1: tuple[float, float]
    size0: float
    size1: float


class VideoSpec(NamedTuple):
    """One video as sampled: its events, one caption per annotation entry, and the seed of its background."""

    duration: float
    events: list[Event]
    captions: list[str]
    seed: int


@dataclass(frozen=True)
class SynthConfig:
    """Everything the dataset depends on; its dict plus the generator version is the manifest."""

    seed: int = 0
    train: int = 120
    val: int = 30
    test: int = 30
    fps: int = 8
    size: int = 224
    min_duration: float = 20.0
    max_duration: float = 40.0
    min_event: float = 2.0
    max_event: float = 12.0
    captions_per_event: int = 1
    generator_version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if self.generator_version not in GENERATOR_VERSIONS:
            raise SynthError(f"generator_version must be one of {GENERATOR_VERSIONS}, got {self.generator_version}")
        if min(self.train, self.val, self.test) < 0:
            raise SynthError(f"video counts must be >= 0, got {self.train}/{self.val}/{self.test}")
        _check_frame(self.fps, self.size)
        if not 0 < self.min_event <= self.max_event <= self.min_duration <= self.max_duration:
            raise SynthError(
                "need 0 < min_event <= max_event <= min_duration <= max_duration seconds, got "
                f"{self.min_event}, {self.max_event}, {self.min_duration}, {self.max_duration}"
            )
        if not 1 <= self.captions_per_event <= PHRASINGS:
            raise SynthError(f"captions_per_event must be in 1..{PHRASINGS}, got {self.captions_per_event}")

    def manifest(self) -> dict:
        fields = asdict(self)
        return {"generator": "vmh-synth", "version": fields.pop("generator_version"), **fields}


def _check_frame(fps: int, size: int) -> None:
    if not (isinstance(fps, int) and fps > 0):
        raise SynthError(f"fps must be a positive integer, got {fps!r}")
    if not (isinstance(size, int) and size >= 32 and size % 2 == 0):
        raise SynthError(f"size must be an even integer >= 32 (yuv420p halves it), got {size!r}")


def describe(event: Event) -> list[str]:
    """Every phrasing of an event, e.g. "a red circle moves to the left", "the red disc slides left"."""
    if event.shape not in NOUNS or event.colour not in COLOURS or event.action not in VERBS:
        raise SynthError(f"unknown event kind: {event.shape!r}, {event.colour!r}, {event.action!r}")
    pairs = product(NOUNS[event.shape], VERBS[event.action])
    return [f"{'a' if i % 2 == 0 else 'the'} {event.colour} {noun} {verb}" for i, (noun, verb) in enumerate(pairs)]


def label(event: Event) -> str:
    """The kind of an event, e.g. "red circle left": what all its phrasings have in common."""
    return f"{event.colour} {event.shape} {event.action}"


def played_backwards(video: Video, length: float, video_id: str) -> Video:
    """The annotations of a synthetic video played backwards from ``length`` seconds (the end of its last feature
    row): spans mirrored about it and kept within the video, every action its reverse in caption and label (a shape
    moving left, played backwards, moves right; one that grows, shrinks), the phrasing kept."""
    annotations = []
    for a in video.annotations:
        label = a.label.split() if a.label else []
        if len(label) != 3 or label[2] not in REVERSE:
            raise SynthError(f"{video.video_id}: {a.sentence!r} has no synthetic label ({a.label!r}) to play backwards")
        spans = tuple((min(max(length - end, 0.0), video.duration), min(max(length - start, 0.0), video.duration))
                      for start, end in a.spans)
        annotations.append(Annotation(_reversed_caption(a.sentence, label[2]), spans,
                                      label=" ".join([*label[:2], REVERSE[label[2]]])))
    return Video(video_id, video.duration, tuple(annotations))


def _reversed_caption(caption: str, action: str) -> str:
    for i, phrase in enumerate(VERBS[action]):
        if caption.endswith(" " + phrase):
            return caption[: -len(phrase)] + VERBS[REVERSE[action]][i]
    raise SynthError(f"{caption!r} does not end in a phrasing of {action!r}")


def sample_events(
    rng: np.random.Generator,
    duration: float,
    fps: int,
    max_events: int = 3,
    min_length: float = 2.0,
    max_length: float = 12.0,
) -> list[Event]:
    """1..max_events events, sorted by start, free to overlap in time; colours are distinct so captions are
    unambiguous. Spans are whole frames; shapes are 14-36% of the frame side and stay inside it."""
    frames = _frame_range(duration, fps, min_length, max_length, f"1..{max_events}", 1 <= max_events <= len(COLOURS))
    events = []
    for colour in rng.choice(list(COLOURS), size=int(rng.integers(1, max_events + 1)), replace=False):
        first, last = _frame_span(rng, *frames)
        shape, action = str(rng.choice(list(NOUNS))), str(rng.choice(list(VERBS)))
        events.append(Event(shape, str(colour), action, first / fps, last / fps, *_geometry(rng, action)))
    return sorted(events, key=lambda e: (e.start, e.end))


def sample_confusable_events(
    rng: np.random.Generator,
    duration: float,
    fps: int,
    max_events: int = 4,
    min_length: float = 2.0,
    max_length: float = 12.0,
) -> list[Event]:
    """2..max_events events of distinct kinds, each after the first sharing one or two of colour, shape and action
    with an earlier one, so that only the whole caption tells them apart. Spans as in ``sample_events``. The count
    is drawn anew after each event and sampling stops once it is no more than the events made: for 4, two, three
    or four events with probabilities 3/9, 4/9 and 2/9."""
    frames = _frame_range(duration, fps, min_length, max_length, f"2..{max_events}", max_events >= 2)
    choices = {"colour": list(COLOURS), "shape": list(NOUNS), "action": list(VERBS)}
    kinds: list[dict[str, str]] = []
    while len(kinds) < int(rng.integers(2, max_events + 1)):
        kind = {name: str(rng.choice(values)) for name, values in choices.items()}
        if kinds:
            parent = kinds[int(rng.integers(len(kinds)))]
            for name in rng.choice(list(choices), size=int(rng.integers(1, 3)), replace=False):
                kind[name] = parent[name]
        if kind not in kinds:
            kinds.append(kind)
    events = []
    for kind in kinds:
        first, last = _frame_span(rng, *frames)
        events.append(Event(kind["shape"], kind["colour"], kind["action"], first / fps, last / fps,
                            *_geometry(rng, kind["action"])))
    return sorted(events, key=lambda e: (e.start, e.end))


def _frame_range(duration: float, fps: int, min_length: float, max_length: float, count: str,
                 count_ok: bool) -> tuple[int, int, int]:
    """(frames of the video, fewest and most frames of an event), or an error when ``count`` events cannot fit."""
    n_frames = round(duration * fps)
    lo, hi = round(min_length * fps), round(max_length * fps)
    if not 1 <= lo <= hi <= n_frames or not count_ok:
        raise SynthError(f"cannot fit {count} events of {min_length}-{max_length} s into {duration} s at {fps} fps")
    return n_frames, lo, hi


def _frame_span(rng: np.random.Generator, n_frames: int, lo: int, hi: int) -> tuple[int, int]:
    """[first, last) frames of one event: its length, then where it starts."""
    length = int(rng.integers(lo, hi + 1))
    first = int(rng.integers(0, n_frames - length + 1))
    return first, first + length


def _geometry(rng: np.random.Generator, action: str) -> tuple:
    """(centre0, centre1, size0, size1) of an action, in fractions of the frame side."""
    if action in ("grow", "shrink"):
        small, big = rng.uniform(0.14, 0.18), rng.uniform(0.32, 0.36)
        centre = tuple(rng.uniform(big / 2, 1 - big / 2, size=2))
        return (centre, centre, small, big) if action == "grow" else (centre, centre, big, small)
    size = rng.uniform(0.2, 0.32)
    travel = min(rng.uniform(0.35, 0.6), 1 - size)
    dx, dy = _DIRECTIONS[action]
    # the start along the path leaves room for the whole travel; the position across it is free
    along = rng.uniform(size / 2 + travel, 1 - size / 2)
    along = along if dx + dy < 0 else 1 - along
    across = rng.uniform(size / 2, 1 - size / 2)
    x0, y0 = (along, across) if dx else (across, along)
    return (x0, y0), (x0 + dx * travel, y0 + dy * travel), size, size


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A near-neutral grey [size, size, 3] uint8: plain, or with a faint gradient and ripple."""
    grey = rng.uniform(90, 170) + rng.uniform(-8, 8, size=3)
    coords = np.linspace(0, 1, size, dtype=np.float32)
    y, x = coords[:, None], coords[None, :]
    a, b = rng.uniform(0, 2 * np.pi, size=2)
    gradient = rng.uniform(0, 20) * (np.cos(a) * x + np.sin(a) * y - 0.5)
    ripple = rng.uniform(0, 6) * np.sin(2 * np.pi * rng.uniform(2, 6) * (np.cos(b) * x + np.sin(b) * y))
    texture = (gradient + ripple) * (rng.random() < 0.7)
    return np.clip(grey + texture[..., None], 0, 255).astype(np.uint8)


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape, in coordinates normalised by its half-size (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1
    if shape == "triangle":
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "star":
        # a filled pentagram is where at least 4 of its 5 edge lines have the point on the centre's side
        sides = sum((u * np.cos(a) + v * np.sin(a) <= _COS72).astype(np.uint8) for a in _STAR_ANGLES)
        return sides >= 4
    raise SynthError(f"unknown shape {shape!r}")


def render_frames(events: list[Event], duration: float, fps: int, size: int, seed: int) -> np.ndarray:
    """The video as [T, size, size, 3] uint8 RGB, one event at a time over all its frames; later events on top."""
    _check_frame(fps, size)
    n_frames = round(duration * fps)
    frames = np.repeat(_background(np.random.default_rng(seed), size)[None], n_frames, axis=0)
    pixels = np.arange(size, dtype=np.float32) + 0.5
    for event in events:
        first, last = round(event.start * fps), round(event.end * fps)
        if not 0 <= first < last <= n_frames:
            raise SynthError(f"event {event.start}-{event.end} s does not fit a {duration} s video at {fps} fps")
        progress = np.linspace(0, 1, last - first, dtype=np.float32)[:, None, None]
        half = (event.size0 + (event.size1 - event.size0) * progress) * size / 2
        cx, cy = ((np.float32(a) + (b - a) * progress) * size for a, b in zip(event.centre0, event.centre1))
        # only the box the shape sweeps over needs testing, a fraction of the frame
        (x0, x1), (y0, y1) = (_span(c, half, size) for c in (cx, cy))
        u = (pixels[None, None, x0:x1] - cx) / half
        v = (pixels[None, y0:y1, None] - cy) / half
        frames[first:last, y0:y1, x0:x1][_mask(event.shape, u, v)] = COLOURS[event.colour]
    return frames


def _span(centre: np.ndarray, half: np.ndarray, size: int) -> tuple[int, int]:
    """The pixel range [lo, hi) that centre +- half covers over all frames, clipped to the frame."""
    lo, hi = float((centre - half).min()), float((centre + half).max())
    return max(0, math.floor(lo)), min(size, math.ceil(hi) + 1)


def render_video(path: str | os.PathLike, events: list[Event], duration: float, fps: int, size: int, seed: int) -> None:
    """Encode the events as an H.264 (yuv420p) MP4 at `path`, written under a temporary name first so that a
    file at `path` is always complete."""
    import av

    frames = render_frames(events, duration, fps, size, seed)
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    os.replace(partial, path)


def sample_video(rng: np.random.Generator, config: SynthConfig) -> VideoSpec:
    """A video's duration (whole frames), events, captions (captions_per_event distinct phrasings per event) and
    background seed, all drawn from `rng`."""
    lo, hi = round(config.min_duration * config.fps), round(config.max_duration * config.fps)
    duration = int(rng.integers(lo, hi + 1)) / config.fps
    sampler = sample_events if config.generator_version == 1 else sample_confusable_events
    events = sampler(rng, duration, config.fps, min_length=config.min_event, max_length=config.max_event)
    picks = [rng.choice(PHRASINGS, size=config.captions_per_event, replace=False) for _ in events]
    captions = [describe(e)[i] for e, chosen in zip(events, picks) for i in chosen]
    return VideoSpec(duration, events, captions, int(rng.integers(2**31)))


def as_video(video_id: str, spec: VideoSpec) -> Video:
    """A sampled video as the datasets' shape: one annotation per caption, with its event's span."""
    per_event = len(spec.captions) // len(spec.events)
    events = [e for e in spec.events for _ in range(per_event)]
    annotations = tuple(Annotation(c, ((e.start, e.end),), label=label(e)) for c, e in zip(spec.captions, events))
    return Video(video_id, spec.duration, annotations)


def plan(config: SynthConfig) -> dict[str, dict[str, VideoSpec]]:
    """{split: {video_id: spec}}; each video has its own generator, seeded by (seed, split, index)."""
    return {
        split: {
            f"{split}_{i:04d}": sample_video(np.random.default_rng([config.seed, s, i]), config)
            for i in range(getattr(config, split))
        }
        for s, split in enumerate(SPLITS)
    }


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(out: str | os.PathLike, config: SynthConfig) -> bool:
    """Whether `out` holds the whole dataset of `config`: the same manifest, every annotation file and video."""
    out = Path(out)
    if _read_manifest(out) != config.manifest():
        return False
    for split in SPLITS:
        annotations = out / f"{split}.json"
        if not annotations.is_file():
            return False
        if not all((out / "videos" / f"{vid}.mp4").is_file() for vid in json.loads(annotations.read_text())):
            return False
    return True


def build_dataset(out: str | os.PathLike, config: SynthConfig, force: bool = False, progress: bool = True) -> bool:
    """Render the dataset into `out`; returns False, doing nothing, when it is already there and complete.

    A directory holding a different dataset is an error unless `force`, so a slip of the output path cannot
    overwrite another dataset. The manifest is written last: a directory without one is an interrupted render.
    """
    from tqdm import tqdm

    out = Path(out)
    if is_complete(out, config):
        log.info("%s already holds this synthetic dataset; skipping", out)
        return False
    wanted, existing = config.manifest(), _read_manifest(out)
    if existing is not None and existing != wanted and not force:
        differs = sorted(k for k in wanted.keys() | existing.keys() if wanted.get(k) != existing.get(k))
        raise SynthError(
            f"{out} holds a different synthetic dataset (differs in {', '.join(differs)}); "
            "choose another output directory or force a re-render (vmh synth --force)"
        )
    (out / "manifest.json").unlink(missing_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    splits = plan(config)
    with tqdm(total=sum(map(len, splits.values())), desc="rendering", unit="video", disable=not progress) as bar:
        for split, videos in splits.items():
            for vid, spec in videos.items():
                path = out / "videos" / f"{vid}.mp4"
                render_video(path, spec.events, spec.duration, config.fps, config.size, spec.seed)
                bar.update()
            dump_activitynet([as_video(vid, spec) for vid, spec in videos.items()], out / f"{split}.json")
    (out / "manifest.json").write_text(json.dumps(wanted, indent=1))
    return True
