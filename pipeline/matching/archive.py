"""Retrospective search: "when did X happen in the last hour" over a bounded archive of recent moment codes.

The archive is a ring buffer of packed codes [capacity, W] with the stream, span and capture time of each moment;
the oldest moments go first when it is full, and moments captured more than ``max_age`` seconds before the newest
one are dropped. A search is one XOR/popcount pass over the codes in the time range.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from pipeline.bus.records import MomentCode
from pipeline.codes.packing import CodeError, hamming


class ArchiveHit(NamedTuple):
    stream_id: str
    start: int
    end: int
    distance: int
    capture_time: float
    partition: int | None = None  # of the moments topic, when the archive is one partition's


class MomentArchive:
    """The last ``capacity`` moments (and none older than ``max_age`` seconds of capture time) of one code space."""

    def __init__(self, bits: int, capacity: int, max_age: float | None = None) -> None:
        if bits <= 0 or bits % 8:
            raise CodeError(f"code length must be a positive multiple of 8 bits, got {bits}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be > 0 seconds or None, got {max_age}")
        self.bits, self.capacity, self.max_age = bits, capacity, max_age
        self._codes = np.zeros((capacity, bits // 8), np.uint8)
        self._streams = np.zeros(capacity, np.int32)  # index into _names
        self._spans = np.zeros((capacity, 2), np.int64)
        self._times = np.full(capacity, -np.inf)  # capture times; -inf marks an empty or dropped slot
        self._names: list[str] = []
        self._name_index: dict[str, int] = {}
        self._next = 0  # slot the next moment goes to
        self._newest = -np.inf

    def __len__(self) -> int:
        return int(np.count_nonzero(self._live()))

    def add(self, moments: Sequence[MomentCode]) -> None:
        """Append moments (oldest first), overwriting the oldest slots when full."""
        if not moments:
            return
        if any(moment.bits != self.bits for moment in moments):
            raise CodeError(f"the archive holds {self.bits}-bit codes")
        moments = moments[-self.capacity:]
        slots = (self._next + np.arange(len(moments))) % self.capacity
        self._codes[slots] = np.stack([m.code for m in moments])
        self._streams[slots] = [self._name_index.setdefault(m.stream_id, len(self._name_index)) for m in moments]
        if len(self._name_index) > len(self._names):
            self._names = list(self._name_index)
        self._spans[slots] = [(m.start, m.end) for m in moments]
        self._times[slots] = [m.capture_time for m in moments]
        self._next = int(slots[-1] + 1) % self.capacity
        self._newest = max(self._newest, float(self._times[slots].max()))
        if self.max_age is not None:
            self._times[self._times < self._newest - self.max_age] = -np.inf

    def search(self, code: np.ndarray, since: float | None = None, until: float | None = None,
               top_k: int = 10) -> list[ArchiveHit]:
        """The ``top_k`` moments captured in [since, until] nearest to ``code``: by distance, then newest first."""
        code = np.asarray(code)
        if code.dtype != np.uint8 or code.shape != (self.bits // 8,):
            raise CodeError(f"query code must be uint8 [{self.bits // 8}], got {code.dtype} {list(code.shape)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        live = self._live()
        if since is not None:
            live &= self._times >= since
        if until is not None:
            live &= self._times <= until
        slots = np.flatnonzero(live)
        distances = hamming(code[None], self._codes[slots])[0]
        if len(slots) > top_k:  # keep every code tied with the k-th distance, then order exactly
            kth = np.partition(distances, top_k - 1)[top_k - 1]
            keep = distances <= kth
            slots, distances = slots[keep], distances[keep]
        order = np.lexsort((-self._times[slots], distances))[:top_k]
        return [ArchiveHit(self._names[self._streams[s]], int(self._spans[s, 0]), int(self._spans[s, 1]),
                           int(d), float(self._times[s])) for s, d in zip(slots[order], distances[order])]

    def _live(self) -> np.ndarray:
        return self._times > -np.inf
