"""Frame features in, moment codes out: the encoder worker's logic, without Kafka.

A stream's seconds are numbered 0, 1, 2, ... by its producer session, and seconds the producer shed or lost to a
reconnect keep their numbers (the record after them says how much is missing), so a moment's seconds are when it
happened. The coder holds one state per stream, that of the session it saw last: a record of another session starts
that session (at ``t == 0``) or rebuilds it from the stream's earlier records (after a restart or a partition move).
A batch of records is processed in rounds: round r advances every stream by its r-th record, so all streams of the
batch go through each layer of the network together.

What cannot be used becomes an error record, never an exception: features of another extractor or width, or with NaN
or infinite values, are refused; a second that repeats or goes back is skipped; missing seconds are bridged with
zeros, and those the producer did not announce are reported. A stream's last second frees its state, and so does
``idle_timeout`` without records; its final moment is marked ``last``. A repeat of the final second marked ``last``
is the producer's end marker for a stream whose final second went out unmarked: it repeats the final moment, marked,
and nothing else.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.bus.records import ErrorRecord, FrameFeatures, MomentCode
from pipeline.model.streaming import StreamingEncoder
from pipeline.partitions import Origin, Partition, StreamPartitions

OUT_OF_ORDER = "out_of_order_second"
HISTORY_INCOMPLETE = "history_incomplete"
BAD_FEATURES = "bad_features"
FOREIGN_EXTRACTOR = "foreign_extractor"

History = Callable[[FrameFeatures, Origin | None], Iterable[FrameFeatures]]


def announced_holes(records: Iterable[FrameFeatures], within: range) -> set[int]:
    """The seconds ``within`` that ``records`` say were shed or lost to a reconnect just before them
    (``gap_seconds``; a record may claim any length, so only the window is ever counted)."""
    return {t for r in records for t in range(max(within.start, r.announced_from), min(within.stop, r.t))}


class LiveCoder:
    """Turns FrameFeatures records, in log order, into the MomentCode records that became final with them.

    ``extractor`` is the extractor id of the features the model was trained on; records of any other are refused
    (None accepts any). ``idle_timeout`` (seconds of ``clock``) frees the state of streams without records.
    """

    def __init__(self, encoder: StreamingEncoder, bits: int, model: str, *, extractor: str | None = None,
                 idle_timeout: float | None = None, clock: Callable[[], float] = time.time):
        self._encoder = encoder
        self.bits, self.model, self.extractor = bits, model, extractor
        self.idle_timeout, self.clock = idle_timeout, clock
        self._sessions: dict[str, str] = {}  # stream -> the session its encoder state belongs to
        self._seen: dict[str, float] = {}  # stream -> clock of its last record
        self._final: dict[str, MomentCode] = {}  # stream -> the last moment of its latest second, for the end marker
        self._partitions = StreamPartitions()

    @property
    def history_seconds(self) -> int:
        """Seconds of a stream's past features that restore its state exactly."""
        return self._encoder.receptive_field

    def __len__(self) -> int:
        """Streams whose state is held."""
        return len(self._sessions)

    def next_second(self, stream_id: str) -> int:
        return self._encoder.next_second(stream_id)

    def needs_history(self, record: FrameFeatures) -> bool:
        """True when the record continues a session whose state is not held (a restart or a partition move)."""
        return record.t > 0 and self._sessions.get(record.stream_id) != record.session

    def restore(self, record: FrameFeatures, history: Iterable[FrameFeatures],
                origin: Origin | None = None) -> list[ErrorRecord]:
        """Rebuild the state of ``record``'s stream and session before ``record.t`` from its earlier records.

        The window's seconds that have no record are zeros, as bridging made them in an uninterrupted run, so
        across holes the producer announced (seconds shed, a reconnect) the state is the same. Seconds missing
        otherwise (retention, a lost record) make the codes that read them approximate, and an error record says so.
        """
        stream_id, next_second = record.stream_id, record.t
        mine = [r for r in history if r.stream_id == stream_id and r.session == record.session and r.t < next_second
                and self._refusal(r) is None]
        needed = min(next_second, self.history_seconds)
        window = range(next_second - needed, next_second)
        tail = np.zeros((needed, self._encoder.video_dim), dtype=np.float32)
        found = {r.t: r.features for r in mine if r.t in window}
        for t, features in found.items():
            tail[t - window.start] = features
        self._encoder.rebuild(stream_id, tail, next_second)
        self._hold(record, origin)
        missing = set(window) - found.keys() - announced_holes([*mine, record], window)
        if not missing:
            return []
        return [self._error(record, origin, HISTORY_INCOMPLETE,
                            f"rebuilt stream state before second {next_second} with {len(missing)} of {needed} "
                            "seconds missing from the features topic; codes of moments reaching into them are "
                            "approximate")]

    def encode(self, records: Iterable[FrameFeatures], origins: Sequence[Origin] | None = None,
               history: History | None = None) -> tuple[list[MomentCode], list[ErrorRecord]]:
        """Advance every stream by its records; what cannot be used is reported, not used.

        ``origins[i]`` is where ``records[i]`` was read (cited by error records, and the partition whose state the
        stream belongs to). ``history(record, origin)`` returns a stream's earlier records, for a session whose state
        is not held; without it such a session starts from zeros (and says so).
        """
        records = list(records)
        origins = list(origins) if origins is not None else [None] * len(records)
        self._evict_idle()
        per_stream: dict[str, list[tuple[FrameFeatures, Origin | None]]] = defaultdict(list)
        errors: list[ErrorRecord] = []
        for record, origin in zip(records, origins):
            refusal = self._refusal(record)
            if refusal is not None:
                errors.append(self._error(record, origin, *refusal))
            else:
                per_stream[record.stream_id].append((record, origin))
        moments: list[MomentCode] = []
        rounds = max((len(queue) for queue in per_stream.values()), default=0)
        for r in range(rounds):
            ready = [record for record, origin in (queue[r] for queue in per_stream.values() if r < len(queue))
                     if self._admit(record, origin, history, moments, errors)]
            if ready:
                moments.extend(self._step(ready))
        return moments, errors

    def _admit(self, record: FrameFeatures, origin: Origin | None, history: History | None,
               moments: list[MomentCode], errors: list[ErrorRecord]) -> bool:
        """Whether the record is its stream's next second, after starting, restoring or bridging the stream as its
        session and second say; what it adds instead (an end marker's moment, error records) goes to the lists."""
        stream_id = record.stream_id
        self._seen[stream_id] = self.clock()
        if record.t == 0 and self._sessions.get(stream_id) != record.session:
            self._drop(stream_id)  # a new producer session
            self._hold(record, origin)
        elif self.needs_history(record):
            earlier = list(history(record, origin)) if history else []
            if record.last and any(e.t == record.t and e.session == record.session for e in earlier):
                return False  # the end marker of a stream whose final second this coder never held
            errors += self.restore(record, earlier, origin)
        expected = self._encoder.next_second(stream_id)
        if record.last and record.t == expected - 1:  # the end marker
            final = self._final.get(stream_id)
            moments += [replace(final, last=True, emitted_time=self.clock())] if final else []
            self._drop(stream_id)
            return False
        if record.t > expected:
            errors += self._bridge(record, origin, expected)
        elif record.t < expected:
            errors.append(self._error(record, origin, OUT_OF_ORDER,
                                      f"second {record.t} repeats or goes back (expected {expected}); skipped"))
            return False
        return True

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the state of the streams read from ``partitions`` (they moved to another worker)."""
        for stream_id in self._partitions.take(partitions):
            self._drop(stream_id)

    def _refusal(self, record: FrameFeatures) -> tuple[str, str] | None:
        """(kind, reason) when the record's features cannot be fed to the model."""
        if self.extractor is not None and record.extractor != self.extractor:
            return FOREIGN_EXTRACTOR, (f"features of extractor {record.extractor or 'unnamed'!r}; this model was "
                                       f"trained on {self.extractor!r}; start the producer with this checkpoint")
        if record.features.size != self._encoder.video_dim:
            return BAD_FEATURES, (f"{record.features.size}-d features; the model reads "
                                  f"{self._encoder.video_dim}-d ones")
        if not np.isfinite(record.features).all():
            return BAD_FEATURES, "features hold NaN or infinite values"
        return None

    def _bridge(self, record: FrameFeatures, origin: Origin | None, expected: int) -> list[ErrorRecord]:
        """Advance the stream over missing seconds expected .. t-1 as if their features were zeros (codes of moments
        reaching into them are approximate). Seconds the producer shed or lost to a reconnect say so on the record
        (``gap_seconds``); any others were lost on the way, and an error says so."""
        stream_id, gap = record.stream_id, record.t - expected
        if gap >= self.history_seconds:  # nothing real is left in the window
            self._encoder.rebuild(stream_id, np.zeros((min(record.t, self.history_seconds),
                                                       self._encoder.video_dim), np.float32), record.t)
        else:
            zeros = np.zeros((1, self._encoder.video_dim), np.float32)
            for _ in range(gap):
                self._encoder.step([stream_id], zeros)  # the moments of missing seconds are not emitted
        if record.announced_from <= expected:
            return []
        return [self._error(record, origin, HISTORY_INCOMPLETE,
                            f"seconds {expected} to {record.t - 1} are missing; bridged with zeros, codes of moments "
                            "reaching into them are approximate")]

    def _step(self, ready: list[FrameFeatures]) -> list[MomentCode]:
        features = np.stack([r.features for r in ready]).astype(np.float32)
        by_stream = {r.stream_id: r for r in ready}
        now = self.clock()
        moments = [
            MomentCode(
                stream_id=m.stream_id,
                start=m.start,
                end=m.end,
                code=m.code,
                bits=self.bits,
                capture_time=by_stream[m.stream_id].capture_time,
                emitted_time=now,
                model=self.model,
                session=by_stream[m.stream_id].session,
            )
            for m in self._encoder.step([r.stream_id for r in ready], features)
        ]
        finals = {m.stream_id: i for i, m in enumerate(moments)}
        for stream_id, i in finals.items():
            self._final[stream_id] = moments[i]
        for record in ready:  # a stream's final moment says so, and its state goes
            if record.last:
                if record.stream_id in finals:
                    moments[finals[record.stream_id]] = replace(moments[finals[record.stream_id]], last=True)
                self._drop(record.stream_id)
        return moments

    def _hold(self, record: FrameFeatures, origin: Origin | None) -> None:
        self._sessions[record.stream_id] = record.session
        self._seen[record.stream_id] = self.clock()
        self._partitions.note(record.stream_id, origin.where if origin else None)

    def _drop(self, stream_id: str) -> None:
        self._encoder.drop(stream_id)
        for state in (self._sessions, self._seen, self._final):
            state.pop(stream_id, None)
        self._partitions.discard(stream_id)

    def _evict_idle(self) -> None:
        if self.idle_timeout is None:
            return
        cutoff = self.clock() - self.idle_timeout
        for stream_id in [s for s, seen in self._seen.items() if seen < cutoff]:
            self._drop(stream_id)

    def _error(self, record: FrameFeatures, origin: Origin | None, kind: str, message: str) -> ErrorRecord:
        where = f"{origin}: " if origin else ""
        return ErrorRecord(source=record.stream_id, kind=kind, time=self.clock(),
                           message=f"{where}stream {record.stream_id!r} second {record.t}: {message}",
                           context={**(origin.context() if origin else {}), "stream_id": record.stream_id,
                                    "session": record.session, "t": record.t})
