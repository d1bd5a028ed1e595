"""Frame features in, moment codes out: the encoder worker's logic, without Kafka.

A stream's seconds are numbered 0, 1, 2, ... by its producer session (a reconnect keeps counting, and marks the gap
on the record), so the causal model sees one contiguous sequence per session; ``t == 0`` starts a new session. A
batch of records is processed in rounds: round r advances every stream by its r-th record, so all streams of the
batch go through each layer of the network together.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Iterable

import numpy as np

from pipeline.bus.records import ErrorRecord, FrameFeatures, MomentCode
from pipeline.model.streaming import StreamingEncoder

OUT_OF_ORDER = "out_of_order_second"
HISTORY_INCOMPLETE = "history_incomplete"


class LiveCoder:
    """Turns FrameFeatures records, in log order, into the MomentCode records that became final with them."""

    def __init__(self, encoder: StreamingEncoder, bits: int, model: str, clock: Callable[[], float] = time.time):
        self.encoder = encoder
        self.bits = bits
        self.model = model
        self.clock = clock

    @property
    def history_seconds(self) -> int:
        """Seconds of a stream's past features that restore its state exactly."""
        return self.encoder.receptive_field

    def needs_history(self, record: FrameFeatures) -> bool:
        """True when the stream is mid-session but its state is gone (a restart or a partition move)."""
        return record.t > 0 and record.stream_id not in self.encoder

    def restore(self, stream_id: str, history: Iterable[FrameFeatures], next_second: int) -> list[ErrorRecord]:
        """Rebuild a stream before ``next_second`` from its earlier records of the same session.

        Uses the contiguous run of seconds that ends at ``next_second - 1``; when retention has dropped part of the
        window, the missing seconds are zeros, the codes that read them are approximate, and an error record says so.
        """
        by_second = {r.t: r.features for r in history if r.stream_id == stream_id and r.t < next_second}
        needed = min(next_second, self.history_seconds)
        first = next_second
        while first > next_second - needed and (first - 1) in by_second:
            first -= 1
        tail = np.zeros((needed, self.encoder.ven.video_dim), dtype=np.float32)
        if first < next_second:
            tail[needed - (next_second - first) :] = np.stack([by_second[t] for t in range(first, next_second)])
        self.encoder.rebuild(stream_id, tail, next_second)
        missing = needed - (next_second - first)
        if not missing:
            return []
        return [
            ErrorRecord(
                source=stream_id,
                kind=HISTORY_INCOMPLETE,
                message=f"rebuilt stream state before second {next_second} with {missing} of {needed} seconds "
                "missing from the features topic; codes of moments reaching into them are approximate",
                time=self.clock(),
            )
        ]

    def encode(self, records: Iterable[FrameFeatures]) -> tuple[list[MomentCode], list[ErrorRecord]]:
        """Advance every stream by its records; seconds that do not continue their stream are reported, not used."""
        per_stream: dict[str, list[FrameFeatures]] = defaultdict(list)
        for record in records:
            per_stream[record.stream_id].append(record)
        moments: list[MomentCode] = []
        errors: list[ErrorRecord] = []
        rounds = max((len(queue) for queue in per_stream.values()), default=0)
        for r in range(rounds):
            batch = [queue[r] for queue in per_stream.values() if r < len(queue)]
            ready = []
            for record in batch:
                if record.t == 0:
                    self.encoder.drop(record.stream_id)  # a new producer session
                if record.t == self.encoder.next_second(record.stream_id):
                    ready.append(record)
                else:
                    errors.append(self._out_of_order(record))
            if ready:
                moments.extend(self._step(ready))
        return moments, errors

    def _step(self, ready: list[FrameFeatures]) -> list[MomentCode]:
        features = np.stack([r.features for r in ready]).astype(np.float32)
        capture = {r.stream_id: r.capture_time for r in ready}
        now = self.clock()
        return [
            MomentCode(
                stream_id=m.stream_id,
                start=m.start,
                end=m.end,
                code=m.code,
                bits=self.bits,
                capture_time=capture[m.stream_id],
                emitted_time=now,
                model=self.model,
            )
            for m in self.encoder.step([r.stream_id for r in ready], features)
        ]

    def _out_of_order(self, record: FrameFeatures) -> ErrorRecord:
        expected = self.encoder.next_second(record.stream_id)
        return ErrorRecord(
            source=record.stream_id,
            kind=OUT_OF_ORDER,
            message=f"second {record.t} does not continue the stream (expected {expected} or 0); skipped",
            time=self.clock(),
        )
