"""Load shedding in front of the frame CNN: a live stream's second that reaches it too late is dropped whole.

The decoder sheds when it falls behind its source (``pipeline.video.source``); this catches the rest, frames that
waited too long between decoding and the CNN, in the queue or behind a slow batch. The decision is taken once per
(stream, second), at its first frame, so a second is either pooled from all its frames or not at all; the dropped
media time goes onto the next kept frame as ``gap``, so the record after the hole says what is missing. Streams not
named live (files pushed without --realtime) always pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterable, Sequence

from pipeline.video.source import SampledFrame


class LoadShedder:
    """``admit`` a batch of sampled frames at wall-clock ``now``: the frames to encode and, per stream, the media
    seconds dropped (here, and by the decoder before them)."""

    def __init__(self, max_lag: float, live: Iterable[str]) -> None:
        if not max_lag > 0:
            raise ValueError(f"max_lag must be > 0, got {max_lag}")
        self.max_lag = max_lag
        self.live = set(live)
        self._second: dict[str, tuple[int, bool]] = {}  # stream -> (its current second, kept)
        self._gap: dict[str, float] = {}  # media seconds dropped since the stream's last kept frame

    def admit(self, frames: Sequence[SampledFrame], now: float) -> tuple[list[SampledFrame], dict[str, float]]:
        kept: list[SampledFrame] = []
        dropped: Counter[str] = Counter()
        for frame in frames:
            stream = frame.stream_id
            dropped[stream] += frame.dropped
            if stream not in self.live:
                kept.append(frame)
                continue
            second, keep = self._second.get(stream, (None, True))
            first = second != frame.second  # the first frame of its second decides for all of them
            if first:
                keep = now - frame.capture_time <= self.max_lag
                self._second[stream] = (frame.second, keep)
            if keep:
                carried = self._gap.pop(stream, 0.0)
                kept.append(replace(frame, gap=frame.gap + carried) if carried else frame)
            else:  # the second, and whatever gap its frames carried, go onto the next kept frame
                dropped[stream] += float(first)
                self._gap[stream] = self._gap.get(stream, 0.0) + frame.gap + float(first)
        return kept, {stream: seconds for stream, seconds in dropped.items() if seconds}

    def forget(self, stream_id: str) -> None:
        """The stream ended: free its state."""
        self._second.pop(stream_id, None)
        self._gap.pop(stream_id, None)
