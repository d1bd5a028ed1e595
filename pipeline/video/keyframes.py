"""One small JPEG per stream second, for people to look at: the frame of that second nearest its middle.

The producer already decodes and scales the frames it samples for the CNN; the keyframe is one of those, so key
frames cost one JPEG encode (Pillow's libjpeg) per stream second and nothing on the feature path. A second's
keyframe goes out with that second's features record and carries its ``t`` and session, which is how a match
event's moment [start, end) names the keyframes of its seconds.
"""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image

from pipeline.bus.records import FrameFeatures, Keyframe
from pipeline.video.source import SampledFrame


class KeyframeSampler:
    """``add`` every batch of sampled frames, then ``take`` the features records the batch completed: one
    ``Keyframe`` per record whose second had a frame, resized to ``side`` x ``side`` pixels."""

    def __init__(self, side: int = 320, quality: int = 80) -> None:
        if side < 16:
            raise ValueError(f"keyframe side must be >= 16 pixels, got {side}")
        self.side, self.quality = side, quality
        self._best: dict[str, tuple[int, float, SampledFrame]] = {}  # stream -> (second, |offset from middle|, frame)
        self._held: dict[tuple[str, int], SampledFrame] = {}  # complete seconds' frames waiting for their record

    def add(self, items: Sequence[object]) -> None:
        for frame in items:
            if not isinstance(frame, SampledFrame):
                continue
            off_middle = abs(frame.media_time - frame.second - 0.5)
            best = self._best.get(frame.stream_id)
            if best is None or frame.second > best[0]:
                if best is not None:
                    self._held[(frame.stream_id, best[0])] = best[2]
                self._best[frame.stream_id] = (frame.second, off_middle, frame)
            elif frame.second == best[0] and off_middle < best[1]:
                self._best[frame.stream_id] = (frame.second, off_middle, frame)

    def take(self, records: Sequence[FrameFeatures]) -> list[Keyframe]:
        """The keyframes of these records' seconds; frames of seconds before them are dropped (a second the
        pooler skipped has no record), and a stream's ``last`` record frees the stream."""
        keyframes = []
        for record in records:
            second = int(record.media_time)
            frame = self._held.pop((record.stream_id, second), None)
            best = self._best.get(record.stream_id)
            if frame is None and best is not None and best[0] == second:
                frame = self._best.pop(record.stream_id)[2]
            for key in [k for k in self._held if k[0] == record.stream_id and k[1] < second]:
                del self._held[key]
            if record.last:
                self._best.pop(record.stream_id, None)
            if frame is not None:
                keyframes.append(Keyframe(record.stream_id, record.t, record.media_time, frame.capture_time,
                                          self._jpeg(frame), record.session))
        return keyframes

    def _jpeg(self, frame: SampledFrame) -> bytes:
        image = Image.fromarray(frame.rgb)
        if image.size != (self.side, self.side):
            image = image.resize((self.side, self.side), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=self.quality)
        return out.getvalue()
