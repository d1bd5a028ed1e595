"""One vector per second of video: the CMHN clip unit.

Frame features are averaged inside each (stream, second) and L2-normalised, as the reference does; a motion tail
(flow cells, pipeline.features.motion) is averaged and keeps its unit, frame sides per second. A second is
emitted as soon as it is complete, which for a stream read in order is when a frame of a later second arrives
(or the stream ends), so a live second leaves the producer one frame interval after its last frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.video.source import SampledFrame


@dataclass(frozen=True)
class PooledSecond:
    stream_id: str
    second: int
    vector: np.ndarray  # float32 [V]: appearance of unit L2 norm, then the motion tail
    frames: int  # sampled frames averaged into it
    capture_time: float  # wall clock of its last frame: when the second was complete upstream
    gap: float  # media seconds missing just before it (a reconnect), 0 when none


@dataclass
class _Partial:
    second: int
    total: np.ndarray  # float64 [V] sum of frame features
    frames: int
    capture_time: float
    gap: float


class SecondPooler:
    """Accumulates frame features of many streams; ``add`` and ``flush`` return the seconds completed."""

    def __init__(self, frames_per_second: int | None = None, motion_dim: int = 0) -> None:
        """With ``frames_per_second`` (the sampler's rate, when whole) a second is emitted as soon as it holds that
        many frames, instead of when the next second's first frame arrives: 1 / rate sooner on a live stream. The
        last ``motion_dim`` features are the motion tail."""
        self.frames_per_second = frames_per_second
        self.motion_dim = motion_dim
        self._open: dict[str, _Partial] = {}
        self._emitted: dict[str, int] = {}  # last second emitted early, per stream
        self._gap: dict[str, float] = {}  # gap carried by stragglers, for the stream's next second

    def add(self, frames: Sequence[SampledFrame], features: Any) -> list[PooledSecond]:
        """Add a batch of frames (any streams, each stream in media-time order) and their features [N, V]."""
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != len(frames):
            raise ValueError(f"features must be [{len(frames)}, V] for {len(frames)} frames, got {feats.shape}")
        if not frames:
            return []
        index: dict[str, int] = {}
        keys = np.array([(index.setdefault(f.stream_id, len(index)), f.second) for f in frames], dtype=np.int64)
        groups, inverse = np.unique(keys, axis=0, return_inverse=True)  # sorted by stream, then second
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(groups)))
        totals = np.add.reduceat(feats[order].astype(np.float64), starts)
        counts = np.bincount(inverse, minlength=len(groups))
        capture = np.maximum.reduceat(np.array([f.capture_time for f in frames])[order], starts)
        gaps = np.add.reduceat(np.array([f.gap for f in frames])[order], starts)

        names = list(index)
        done: list[tuple[str, _Partial]] = []
        for g, (stream, second) in enumerate(groups.tolist()):
            name = names[stream]
            if second <= self._emitted.get(name, -1):  # a straggler of a second already out: dropped, its gap kept
                self._gap[name] = self._gap.get(name, 0.0) + float(gaps[g])
                continue
            partial = self._open.get(name)
            if partial is not None and partial.second == second:
                partial.total += totals[g]
                partial.frames += int(counts[g])
                partial.capture_time = max(partial.capture_time, float(capture[g]))
                partial.gap += float(gaps[g])
            else:
                if partial is not None and partial.second > second:
                    raise ValueError(f"stream {name}: frame of second {second} arrived after second {partial.second}")
                if partial is not None:
                    done.append((name, partial))
                partial = self._open[name] = _Partial(second, totals[g], int(counts[g]), float(capture[g]),
                                                      float(gaps[g]) + self._gap.pop(name, 0.0))
            if self.frames_per_second and partial.frames >= self.frames_per_second:
                done.append((name, self._open.pop(name)))
                self._emitted[name] = second
        return _finish(done, self.motion_dim)

    def close(self, stream_id: str, second: int) -> list[PooledSecond]:
        """``second`` of the stream gets no more frames (its source began shedding): emit it now if it is open.
        Frames of it that still come are stragglers, dropped."""
        partial = self._open.get(stream_id)
        if partial is None or partial.second != second:
            return []  # already out, or a later second has begun
        self._emitted[stream_id] = second
        return _finish([(stream_id, self._open.pop(stream_id))], self.motion_dim)

    def flush(self, stream_id: str | None = None) -> list[PooledSecond]:
        """End of a stream (or of all streams): emit what is still open."""
        names = list(self._open) if stream_id is None else [stream_id] if stream_id in self._open else []
        for name in [stream_id] if stream_id is not None else list(self._emitted):  # a straggler's gap is of one of them
            self._emitted.pop(name, None)
            self._gap.pop(name, None)
        return _finish([(name, self._open.pop(name)) for name in names], self.motion_dim)


def _finish(done: list[tuple[str, _Partial]], motion_dim: int) -> list[PooledSecond]:
    """Normalise the completed sums' appearance in one go (the mean's direction is the sum's, so dividing by
    counts is moot there) and average their motion tails."""
    if not done:
        return []
    totals = np.stack([p.total for _, p in done])
    head = totals.shape[1] - motion_dim
    vectors = np.empty(totals.shape, np.float32)
    vectors[:, :head] = totals[:, :head] / np.maximum(np.linalg.norm(totals[:, :head], axis=1, keepdims=True), 1e-12)
    vectors[:, head:] = totals[:, head:] / np.array([p.frames for _, p in done])[:, None]
    return [
        PooledSecond(name, p.second, vectors[i], p.frames, p.capture_time, p.gap) for i, (name, p) in enumerate(done)
    ]
