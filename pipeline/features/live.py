"""Sampled frames of many streams in, per-second feature records out: the producer worker's logic, without Kafka.

Each stream's seconds are numbered 0, 1, 2, ... by this session: a reconnect keeps counting, whole seconds lost to it
or shed keep their numbers, and the first record after a hole carries the media time lost, so the encoder downstream
knows a hole from a lost record, and moments after a hole are numbered by when they happened.
Records name the producer session and the extractor that made them. A stream that ends marks its final second
``last``; when that second already went out (it was complete before the end was known), it goes out once more,
marked, as the end marker. With a ``LoadShedder``, late seconds of live streams are dropped before the CNN and
show as gaps on the records after them; a source that begins shedding (``Shedding``) has its second in progress sent
at once, as far as it got.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from pipeline.bus.records import CORRUPT_VIDEO, DEAD_SOURCE, ErrorRecord, FrameFeatures, extractor_id
from pipeline.features.backbone import FrameEncoder
from pipeline.features.pooling import PooledSecond, SecondPooler
from pipeline.features.shedding import LoadShedder
from pipeline.video.multi import Item, StreamEnded, StreamError
from pipeline.video.source import CorruptSource, SampledFrame, Shedding


@dataclass
class Featurized:
    """What one batch of decoded items became."""

    records: list[FrameFeatures] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    frames: dict[str, int] = field(default_factory=dict)  # sampled frames per stream
    dropped: dict[str, float] = field(default_factory=dict)  # media seconds shed per stream


class LiveFeaturizer:
    """Batches frames of all streams through the CNN at once and pools them into one record per stream second."""

    def __init__(self, encoder: FrameEncoder, clock: Callable[[], float] = time.time,
                 session: str | None = None, shedder: LoadShedder | None = None) -> None:
        self.encoder = encoder
        rate = encoder.sample_rate
        self.pooler = SecondPooler(int(rate) if float(rate).is_integer() else None, encoder.motion_dim)
        self.clock = clock
        self.shedder = shedder
        self.session = session or uuid.uuid4().hex[:16]
        self.extractor = extractor_id(encoder.identity())
        self._next_t: dict[str, int] = {}
        self._latest: dict[str, FrameFeatures] = {}  # each stream's latest record, for its end marker

    def process(self, items: Sequence[Item]) -> Featurized:
        out = Featurized()
        frames = [item for item in items if isinstance(item, SampledFrame)]
        if self.shedder is not None:
            frames, out.dropped = self.shedder.admit(frames, self.clock())
        if frames:
            features = self.encoder.encode_frames(frames)
            out.records += self._records(self.pooler.add(frames, features))
            out.frames = Counter(f.stream_id for f in frames)
        for item in items:
            if isinstance(item, Shedding):  # after the batch's frames: a later frame of its stream may have closed it
                out.records += self._records(self.pooler.close(item.stream_id, item.second))
            if isinstance(item, (StreamEnded, StreamError)):
                out.records += self._end(item.stream_id)
                out.ended.append(item.stream_id)
            if isinstance(item, StreamError):
                out.errors.append(self._error(item))
        return out

    def _end(self, stream_id: str) -> list[FrameFeatures]:
        """The stream's remaining records, the final one marked ``last`` (or the end marker); everything kept of
        the stream (motion, shedding) is freed here, in one place."""
        records = self._records(self.pooler.flush(stream_id))
        final = records.pop() if records else self._latest.get(stream_id)
        self._latest.pop(stream_id, None)
        self.encoder.forget(stream_id)
        if self.shedder is not None:
            self.shedder.forget(stream_id)
        return records + ([replace(final, last=True)] if final is not None else [])

    def _records(self, seconds: list[PooledSecond]) -> list[FrameFeatures]:
        records = []
        for second in seconds:
            # whole seconds shed or lost to a reconnect keep their numbers: t stays the stream's media second, so
            # moments and match events after a gap say when they happened
            t = self._next_t.get(second.stream_id, 0) + int(second.gap)
            self._next_t[second.stream_id] = t + 1
            records.append(
                FrameFeatures(
                    stream_id=second.stream_id,
                    t=t,
                    media_time=float(second.second),
                    capture_time=second.capture_time,
                    features=second.vector,
                    gap=second.gap > 0,
                    gap_seconds=float(second.gap),
                    session=self.session,
                    extractor=self.extractor,
                )
            )
            self._latest[second.stream_id] = records[-1]
        return records

    def _error(self, item: StreamError) -> ErrorRecord:
        kind = CORRUPT_VIDEO if isinstance(item.error, CorruptSource) else DEAD_SOURCE
        return ErrorRecord(source=item.stream_id, kind=kind, message=f"stream {item.stream_id}: {item.error}",
                           time=self.clock())
