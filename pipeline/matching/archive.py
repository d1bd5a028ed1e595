"""Retrospective search: "when did X happen today" over an archive of a day of moment codes.

Memory is what bounds an archive, so it holds columns, not objects, in blocks of ``BLOCK`` moments allocated as
moments arrive: per moment its code (B/8 bytes), capture time (float64), start second (int32), length in seconds
(uint16) and stream (uint32, an index into the archive's stream names), 34 bytes for 128-bit codes
(``bytes_per_moment``). The oldest moments go first when it holds ``capacity``, and moments captured more than
``max_age`` seconds before the newest one are dropped; whole blocks are freed once none of their moments is kept.

A search ranks the moments captured in [since, until] by distance, then capture time newest first, then newest
archived first (log order, so a restored archive ranks as the one it replaces). Blocks are scanned only where
their capture times meet the range (moments arrive in about capture order, so a range touches few blocks
partially), each with faiss's exact top-k over the block's own array; ties at the k-th distance are settled
exactly (see ``_Ranking``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from pipeline.bus.records import MomentCode
from pipeline.codes.packing import CodeError
from pipeline.matching.matcher import faiss_knn, faiss_range

BLOCK = 1 << 20  # moments per block: 16 MB of 128-bit codes, 34 MB with their metadata (touched as filled)
_EXTRA = 16  # candidates beyond k a block returns, so that ties at the k-th distance rarely need a second pass
_MAX_OUTSIDE = 4096  # rows outside the range a cut block's scan may hold (and drop) before they are copied out
_MAX_LENGTH = np.iinfo(np.uint16).max
_MIN_START, _MAX_START = np.iinfo(np.int32).min, np.iinfo(np.int32).max


class ArchiveHit(NamedTuple):
    stream_id: str
    start: int
    end: int
    distance: int
    capture_time: float
    partition: int | None = None  # of the moments topic, when the archive is one partition's


class _Block:
    """``rows`` slots of columns; ``size`` of them filled, in arrival order; ``first`` is the sequence number of
    row 0 (moments archived before it)."""

    def __init__(self, rows: int, width: int, first: int) -> None:
        self.codes = np.empty((rows, width), np.uint8)
        self.times = np.empty(rows, np.float64)
        self.starts = np.empty(rows, np.int32)
        self.lengths = np.empty(rows, np.uint16)
        self.streams = np.empty(rows, np.uint32)
        self.size, self.first = 0, first
        self.low, self.high = np.inf, -np.inf  # capture times of the filled rows

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.times, self.starts, self.lengths, self.streams))


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
        self._rows = min(BLOCK, capacity)
        self._blocks: list[_Block] = []
        self._head = 0  # rows of the first block that are gone (beyond the capacity)
        self._count = 0  # moments ever archived: the next one's sequence number
        self._names: list[str] = []
        self._name_index: dict[str, int] = {}
        self._newest = -np.inf

    @property
    def bytes_per_moment(self) -> int:
        return self.bits // 8 + 8 + 4 + 2 + 4

    @property
    def nbytes(self) -> int:
        """Bytes of the columns allocated (filled or not): the archive's memory but for its stream names."""
        return sum(block.nbytes for block in self._blocks)

    def __len__(self) -> int:
        cutoff = self._cutoff()
        return sum(int(np.count_nonzero(block.times[start:block.size] >= cutoff)) if block.low < cutoff
                   else block.size - start for block, start in self._segments())

    def add(self, moments: Sequence[MomentCode]) -> None:
        """Append moments (oldest first), dropping the oldest beyond the capacity or the age."""
        if not moments:
            return
        if any(moment.bits != self.bits for moment in moments):
            raise CodeError(f"the archive holds {self.bits}-bit codes")
        moments = moments[-self.capacity:]
        names: dict[str, int] = {}
        streams = np.fromiter((names.setdefault(m.stream_id, len(names)) for m in moments), np.int64, len(moments))
        self.extend(np.frombuffer(b"".join(m.code.tobytes() for m in moments), np.uint8).reshape(len(moments), -1),
                    np.fromiter((m.capture_time for m in moments), np.float64, len(moments)),
                    np.fromiter((m.start for m in moments), np.int64, len(moments)),
                    np.fromiter((m.end for m in moments), np.int64, len(moments)), streams, list(names))

    def extend(self, codes: np.ndarray, times: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               streams: np.ndarray, names: Sequence[str]) -> None:
        """``add`` for columns (oldest first): packed codes [n, W], capture times, start and end seconds, and each
        moment's stream as an index into ``names``."""
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.bits // 8:
            raise CodeError(f"the archive holds {self.bits}-bit codes, got {codes.dtype} {list(codes.shape)}")
        if not len(codes):
            return
        keep = slice(-self.capacity, None)
        codes, times, starts, streams = codes[keep], times[keep], starts[keep], streams[keep]
        lengths = ends[keep] - starts
        if starts.min() < _MIN_START or starts.max() > _MAX_START or lengths.min() < 0 or lengths.max() > _MAX_LENGTH:
            raise ValueError(f"moment spans must start within int32 seconds and last 0 to {_MAX_LENGTH} s")
        index = self._name_index
        streams = np.array([index.setdefault(name, len(index)) for name in names], np.uint32)[streams]
        self._names.extend(list(index)[len(self._names):])
        done = 0
        while done < len(codes):
            if not self._blocks or self._blocks[-1].size == self._rows:
                self._blocks.append(_Block(self._rows, self.bits // 8, self._count))
            block = self._blocks[-1]
            n = min(self._rows - block.size, len(codes) - done)
            rows, part = slice(block.size, block.size + n), slice(done, done + n)
            block.codes[rows], block.times[rows] = codes[part], times[part]
            block.starts[rows], block.lengths[rows], block.streams[rows] = starts[part], lengths[part], streams[part]
            block.low, block.high = min(block.low, times[part].min()), max(block.high, times[part].max())
            block.size += n
            done += n
            self._count += n
        self._newest = max(self._newest, float(times.max()))
        self._drop()

    def search(self, code: np.ndarray, since: float | None = None, until: float | None = None,
               top_k: int = 10) -> list[ArchiveHit]:
        """The ``top_k`` moments captured in [since, until] nearest to ``code``: by distance, then newest first."""
        code = np.asarray(code)
        if code.dtype != np.uint8 or code.shape != (self.bits // 8,):
            raise CodeError(f"query code must be uint8 [{self.bits // 8}], got {code.dtype} {list(code.shape)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        low = max(-np.inf if since is None else since, self._cutoff())
        high = np.inf if until is None else until
        ranking = _Ranking(code[None], top_k)
        for block, start in self._segments():
            if block.high < low or block.low > high:
                continue
            if low <= block.low and block.high <= high:
                ranking.offer(block, start, block.size)
                continue
            times = block.times[start:block.size]
            inside = (times >= low) & (times <= high)
            if not inside.any():
                continue
            first, stop = int(inside.argmax()), len(inside) - int(inside[::-1].argmax())
            inside = inside[first:stop]
            if len(inside) - np.count_nonzero(inside) <= _MAX_OUTSIDE:  # about capture order: scan the span
                ranking.offer(block, start + first, start + stop, inside)
            else:
                ranking.offer(block, start + np.flatnonzero(inside) + first)
        return [ArchiveHit(self._names[block.streams[row]], int(block.starts[row]),
                           int(block.starts[row]) + int(block.lengths[row]), distance, float(block.times[row]))
                for block, row, distance in ranking.result()]

    def _segments(self) -> list[tuple[_Block, int]]:
        """Each block with its first kept row."""
        return [(block, self._head if i == 0 else 0) for i, block in enumerate(self._blocks)]

    def _cutoff(self) -> float:
        return -np.inf if self.max_age is None else self._newest - self.max_age

    def _drop(self) -> None:
        """Forget the moments beyond the capacity, and free the blocks that keep none."""
        held = sum(block.size for block in self._blocks) - self._head
        self._head += max(0, held - self.capacity)
        cutoff = self._cutoff()
        while self._blocks and (self._head >= self._blocks[0].size == self._rows or self._blocks[0].high < cutoff):
            self._head = max(0, self._head - self._blocks.pop(0).size)


class _Ranking:
    """The exact top-k of one query over rows of blocks, by (distance, capture time newest first, sequence newest
    first). Each block's rows in the range give their k + ``_EXTRA`` nearest by faiss (by distance, then lower row);
    once every block is offered, D, the k-th smallest distance of all, is known, and a block whose last candidate is
    still at D may hold more codes at D than it returned: it is range-searched again at D + 1. So every code at a
    distance <= D is a candidate, and they are ordered exactly.

    A block that the range cuts is scanned as the span from its first row in the range to its last, a view, with as
    many more candidates asked as the span holds rows outside the range, which are then dropped; when they are too
    many (moments far out of capture order), the rows in the range are copied out instead."""

    def __init__(self, query: np.ndarray, k: int) -> None:
        self.query, self.k = query, k
        self.offered: list[tuple] = []  # (block, rows, stop, inside, distances, found, the last distance or None)

    def offer(self, block: _Block, rows: int | np.ndarray, stop: int = 0, inside: np.ndarray | None = None) -> None:
        """Rows [rows, stop) of a block (``inside`` marks those in the range, None: all), or ascending row numbers."""
        codes = block.codes[rows:stop] if isinstance(rows, int) else block.codes[rows]
        outside = 0 if inside is None else len(inside) - int(np.count_nonzero(inside))
        want = min(self.k + _EXTRA + outside, len(codes))
        distances, found = faiss_knn(self.query, codes, want)
        distances, found = distances[0].astype(np.int64), found[0]
        last = int(distances[-1]) if want < len(codes) else None  # None: every row was returned
        if inside is not None:
            keep = inside[found]
            distances, found = distances[keep], found[keep]
        self.offered.append((block, rows, stop, inside, distances, found, last))

    def result(self) -> list[tuple[_Block, int, int]]:
        """(block, row, distance) of the k best, best first."""
        every = np.concatenate([np.zeros(0, np.int64)] + [offer[4] for offer in self.offered])
        if not len(every):
            return []
        kth = int(np.partition(every, self.k - 1)[self.k - 1]) if len(every) >= self.k else int(every.max())
        blocks, rows, distances, times, sequence = [], [], [], [], []
        for i, (block, offered, stop, inside, d, found, last) in enumerate(self.offered):
            if last is not None and last <= kth:  # rows beyond those returned may sit at the k-th distance too
                codes = block.codes[offered:stop] if isinstance(offered, int) else block.codes[offered]
                _, d, found = faiss_range(self.query, codes, kth + 1)
                if inside is not None:
                    d, found = d[inside[found]], found[inside[found]]
            keep = d <= kth
            picked = found[keep] + offered if isinstance(offered, int) else offered[found[keep]]
            blocks.append(np.full(len(picked), i))
            rows.append(picked)
            distances.append(d[keep])
            times.append(block.times[picked])
            sequence.append(block.first + picked)
        which, rows_, distances_ = np.concatenate(blocks), np.concatenate(rows), np.concatenate(distances)
        order = np.lexsort((-np.concatenate(sequence), -np.concatenate(times), distances_))[:self.k]
        return [(self.offered[which[j]][0], int(rows_[j]), int(distances_[j])) for j in order]
