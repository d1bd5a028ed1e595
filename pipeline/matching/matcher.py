"""Exact Hamming search over packed binary codes: top-k and range search, with faiss ``IndexBinaryFlat``'s results.

Conventions, as faiss (the tests check equality with faiss-cpu): top-k distances ascend and ties go to the lower
database index; when k exceeds the database, rows are padded with distance ``MISSING_DISTANCE`` (INT32_MAX) and
index -1; ``range_search`` returns, per query, the codes with distance strictly below the radius in database order.
Every kernel gives exactly these results, so which one runs changes the speed only.

Kernels:
- ``faiss``: faiss's own Hamming scans (``knn_hamming``, ``hamming_range_search``) over this index's array, no copy;
  range search goes tile by tile so that a tile of codes stays in cache while every query passes over it;
- ``popcount``: XOR with each query and ``np.bitwise_count`` on the widest words;
- ``matmul``: with the codes as +-1 vectors, q . x = bits - 2 d(q, x), so a block of queries against a tile of
  codes is one int8 matrix product (``torch._int_mm``); fast only where the CPU has int8 dot-product instructions
  that torch uses (VNNI, AMX): on an AVX2-only AMD EPYC it compared 3.0e6 pairs/s against faiss's 5.8e8.
``auto`` picks per regime (fewer or at least ``MANY_QUERIES`` queries) by a calibration of a few milliseconds on
first use in the process (``chosen_kernel``): faiss unless another kernel is more than ``_FAISS_MARGIN`` times as
fast on this machine, so no machine gets a path much slower than faiss.

In the popcount and matmul kernels hits are rare, so a tile is first reduced to its row minima and only rows with a
hit are compared and scanned (``_below``). Top-k never sorts a tile: each query keeps a bound (its k-th best
distance so far, set from the first tile by a partition), only codes strictly below it are collected (a later code
loses ties), and the collected candidates are compacted with one sort of packed (query, distance, index) keys
whenever they double.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from pipeline.codes.packing import CodeError, as_words

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MISSING_DISTANCE = int(np.iinfo(np.int32).max)
MISSING_INDEX = -1
KERNELS = ("auto", "faiss", "popcount", "matmul")
MANY_QUERIES = 24  # "auto" calibrates searches of fewer queries and of at least this many apart
_FAISS_MARGIN = 1.1  # "auto" takes another kernel than faiss only when it is this many times as fast
_FAISS_RANGE_TILE = 32768  # database codes per faiss range-search call: 512 KB of 128-bit codes, in L2
_POPCOUNT_TILE_PAIRS = 1 << 16  # query x code pairs per popcount tile: the uint64 scratch stays in L2
_MATMUL_TILE = 2048  # database codes per matmul tile
_MATMUL_BLOCK = 256  # queries per matrix product: the 2 MB int32 output tile stays in L2
_COMPACT_BUDGET = 1 << 16  # candidates collected before they are compacted to k per query (at least 2k per query)


class BinaryIndex:
    """Packed ``bits``-bit codes searched exhaustively, like faiss ``IndexBinaryFlat(bits)``.

    ``add`` only appends; the layouts the popcount and matmul kernels read (word planes, unpacked bits) are built
    on their first search after it and kept, so build the index once and search it many times. Searches reuse
    scratch memory: do not search one index from two threads at once.
    """

    def __init__(self, bits: int, kernel: str = "auto") -> None:
        if bits <= 0 or bits % 8:
            raise CodeError(f"code length must be a positive multiple of 8 bits, got {bits}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.bits, self.kernel = bits, kernel
        self._codes = np.empty((0, bits // 8), np.uint8)
        self._planes: np.ndarray | None = None  # [words, N]: word w of every code, contiguous
        self._signs: torch.Tensor | None = None  # int8 [bits, N] of +-1, for the matmul kernel
        self._out: torch.Tensor | None = None  # the matmul kernel's output tiles

    @property
    def ntotal(self) -> int:
        return len(self._codes)

    def add(self, codes: np.ndarray) -> None:
        self._codes = np.concatenate([self._codes, self._check(codes, "codes")])
        self._planes = self._signs = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances int32 [Q, k] ascending and database indices int64 [Q, k] of the k nearest codes."""
        queries = self._check(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self._kernel(len(queries)) == "faiss" and len(queries) and self.ntotal:
            return faiss_knn(queries, self._codes, int(k))
        best, scale, tiles = _TopK(len(queries), int(k), self.bits, self.ntotal), *self._tiles(queries)
        for q0, n0, values in tiles:
            best.offer(q0, n0, values, scale)
        return best.result()

    def range_search(self, queries: np.ndarray, radius: int | np.ndarray) -> tuple[np.ndarray, ...]:
        """Codes at distance < radius: ``lims`` int64 [Q + 1], distances int32 and indices int64, where query i's
        results are ``[lims[i]:lims[i + 1]]`` in database order.

        ``radius`` may also be an int array [N], a radius per database code (a standing query's threshold + 1).
        Each tile is compared with its largest radius, then the few codes below it with their own, so codes with
        similar radii should sit together (``StandingQueries`` orders its codes by threshold).
        """
        queries = self._check(queries, "queries")
        if isinstance(radius, np.ndarray):
            if radius.shape != (self.ntotal,) or not np.issubdtype(radius.dtype, np.integer):
                raise ValueError(f"per-code radii must be integers [{self.ntotal}], got {radius.dtype} {radius.shape}")
        elif isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
            raise ValueError(f"radius must be an integer or an int array [N], got {radius!r}")
        radii = np.broadcast_to(np.asarray(radius, np.int64), (self.ntotal,))
        rows, dists, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for r, d, c in self._range_tiles(queries, radii):
            rows.append(r)
            dists.append(d)
            cols.append(c)
        q = np.concatenate(rows)
        order = np.argsort(q, kind="stable")  # tiles come in database order, so each query's results stay in it
        lims = np.zeros(len(queries) + 1, np.int64)
        np.cumsum(np.bincount(q, minlength=len(queries)), out=lims[1:])
        return lims, np.concatenate(dists)[order].astype(np.int32), np.concatenate(cols)[order].astype(np.int64)

    def _check(self, codes: np.ndarray, name: str) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.bits // 8:
            raise CodeError(f"{name} must be uint8 [n, {self.bits // 8}] for {self.bits}-bit codes, "
                            f"got {codes.dtype} {list(codes.shape)}")
        return codes

    def _kernel(self, queries: int) -> str:
        return chosen_kernel(queries >= MANY_QUERIES) if self.kernel == "auto" else self.kernel

    def _range_tiles(self, queries: np.ndarray, radii: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
        """(query rows, distances, database indices) of the hits below each code's radius, tile by tile in
        database order. A tile is searched at its largest radius, then each hit is kept below its code's own."""
        if not (len(queries) and self.ntotal):
            return
        if self._kernel(len(queries)) == "faiss":
            for n0 in range(0, self.ntotal, _FAISS_RANGE_TILE):
                own = radii[n0:n0 + _FAISS_RANGE_TILE]
                r, d, c = faiss_range(queries, self._codes[n0:n0 + _FAISS_RANGE_TILE], min(int(own.max()),
                                                                                            self.bits + 1))
                keep = d < own[c]
                yield r[keep], d[keep], c[keep] + n0
            return
        scale, tiles = self._tiles(queries)
        for q0, n0, values in tiles:
            own = radii[n0:n0 + values.shape[1]]
            r, c = _below(values, scale.value(int(own.max())))
            d = scale.distance(values[r, c])
            keep = d < own[c]
            yield r[keep] + q0, d[keep], c[keep] + n0

    def _tiles(self, queries: np.ndarray) -> tuple[_Scale, Iterator[tuple[int, int, np.ndarray]]]:
        """The popcount or matmul kernel's value scale and its tiles (first query, first code, values [Qb, Nb]) in
        database order."""
        if not (len(queries) and self.ntotal):
            return _Scale.of(1, 0, np.uint8), iter(())
        if self._kernel(len(queries)) == "matmul":
            return _Scale.of(2, self.bits, np.int32), self._matmul_tiles(queries)
        return _Scale.of(1, 0, np.min_scalar_type(self.bits)), self._popcount_tiles(queries)

    def _popcount_tiles(self, queries: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Values are distances."""
        if self._planes is None:
            self._planes = np.ascontiguousarray(as_words(self._codes).T)
        planes, words = self._planes, as_words(queries)
        block = min(len(queries), 64)
        tile = max(_POPCOUNT_TILE_PAIRS // block, 1024)
        scratch = np.empty((block, tile), planes.dtype)
        counts = np.empty((block, tile), np.uint8)
        total = np.empty((block, tile), np.min_scalar_type(self.bits))
        for n0 in range(0, self.ntotal, tile):
            n1 = min(n0 + tile, self.ntotal)
            for q0 in range(0, len(queries), block):
                q1 = min(q0 + block, len(queries))
                buf, acc, tmp = scratch[:q1 - q0, :n1 - n0], total[:q1 - q0, :n1 - n0], counts[:q1 - q0, :n1 - n0]
                for w in range(planes.shape[0]):
                    np.bitwise_xor(planes[w, n0:n1], words[q0:q1, w, None], out=buf)
                    if w == 0:
                        np.bitwise_count(buf, out=acc)
                    else:
                        np.add(acc, np.bitwise_count(buf, out=tmp), out=acc)
                yield q0, n0, acc

    def _matmul_tiles(self, queries: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Values are 2d - bits: with +-1 codes, -q . x = 2 d(q, x) - bits, one int8 matrix product per block."""
        import torch

        if self._signs is None:
            self._signs = torch.from_numpy(_signs(self._codes).T.copy())
        negated = torch.from_numpy(-_signs(queries))
        if self._out is None:  # kept: first-touching 2 MB of fresh pages costs more than the product
            self._out = torch.empty(_MATMUL_BLOCK * _MATMUL_TILE, dtype=torch.int32)
        out = self._out
        for n0 in range(0, self.ntotal, _MATMUL_TILE):
            tile = self._signs[:, n0:n0 + _MATMUL_TILE]
            for q0 in range(0, len(queries), _MATMUL_BLOCK):
                block = negated[q0:q0 + _MATMUL_BLOCK]
                values = out[:len(block) * tile.shape[1]].view(len(block), tile.shape[1])
                yield q0, n0, torch._int_mm(block, tile, out=values).numpy()


@dataclass(frozen=True)
class _Scale:
    """How a kernel's tile values relate to distances: v = factor * d - shift (monotonic, so v compares as d)."""

    factor: int
    shift: int
    low: int  # the range of the tiles' dtype
    high: int

    @classmethod
    def of(cls, factor: int, shift: int, dtype: type) -> _Scale:
        info = np.iinfo(dtype)
        return cls(factor, shift, int(info.min), int(info.max))

    def value(self, distance: int) -> int:
        """The tile value of a distance, clipped into the tiles' dtype so that a comparison does not upcast the
        tile. Clipping is exact: tile values never reach the dtype's limits (distances are at most ``bits``)."""
        return min(max(self.factor * distance - self.shift, self.low), self.high)

    def distance(self, values: np.ndarray) -> np.ndarray:
        return (values.astype(np.int64) + self.shift) // self.factor


class _TopK:
    """The k smallest (distance, index) pairs per query, fed distance tiles in increasing database order."""

    def __init__(self, queries: int, k: int, bits: int, n: int) -> None:
        self.k, self.bits, self.n = k, bits, max(n, 1)
        self.bound = np.full(queries, bits + 1, np.int64)  # a new code is a candidate only if its distance < bound
        self.found: list[np.ndarray] = []  # packed keys (query, distance, index), see _pack
        self.pending = 0
        self.budget = max(2 * queries * k, _COMPACT_BUDGET)  # compact when the candidates double the k kept

    def offer(self, q0: int, n0: int, values: np.ndarray, scale: _Scale) -> None:
        limit = self.bound[q0:q0 + len(values)]
        loosest = int(limit.max())
        if loosest > self.bits and values.shape[1] >= self.k:  # some query has no k codes yet
            limit = self._bound_by_first_tile(q0, values, scale)
            loosest = int(limit.max())
        # one scalar comparison against the block's loosest limit (fast in any dtype), then the exact limits
        r, c = _below(values, scale.value(loosest))
        if not len(r):
            return
        d = scale.distance(values[r, c])
        keep = d < limit[r]
        self.found.append(self._pack(r[keep] + q0, d[keep], c[keep] + n0))
        self.pending += len(self.found[-1])
        if self.pending > self.budget:
            self._compact()

    def _bound_by_first_tile(self, q0: int, values: np.ndarray, scale: _Scale) -> np.ndarray:
        """Bound the queries without k codes by the k-th distance of this tile; return this tile's limits."""
        limit = self.bound[q0:q0 + len(values)].copy()
        fresh = np.flatnonzero(limit > self.bits)
        kth = scale.distance(np.partition(values[fresh], self.k - 1, axis=1)[:, self.k - 1])
        limit[fresh] = kth + 1  # ties within this tile are kept, the sort by index settles them
        self.bound[q0 + fresh] = kth  # later codes lose ties to these k
        return limit

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        q, d, i, rank = self._compact()
        distances = np.full((len(self.bound), self.k), MISSING_DISTANCE, np.int32)
        indices = np.full((len(self.bound), self.k), MISSING_INDEX, np.int64)
        distances[q, rank], indices[q, rank] = d, i
        return distances, indices

    def _pack(self, q: np.ndarray, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        # sorts by query, distance, index; fits int64 while queries * (bits + 1) * n < 2**63
        return (q.astype(np.int64) * (self.bits + 1) + d) * self.n + i

    def _compact(self) -> tuple[np.ndarray, ...]:
        """Keep the k best found per query, tighten the bounds; return the survivors as (q, d, i, rank)."""
        keys = np.sort(np.concatenate(self.found)) if self.found else np.empty(0, np.int64)
        qd, i = np.divmod(keys, self.n)
        q, d = np.divmod(qd, self.bits + 1)
        rank = np.arange(len(q)) - np.searchsorted(q, np.arange(len(self.bound)))[q]
        keep = rank < self.k
        q, d, i, rank, keys = q[keep], d[keep], i[keep], rank[keep], keys[keep]
        full = rank == self.k - 1
        self.bound[q[full]] = np.minimum(self.bound[q[full]], d[full])
        self.found, self.pending = [keys], len(keys)
        return q, d, i, rank


def _signs(codes: np.ndarray) -> np.ndarray:
    """int8 [n, bits] of +-1 from packed codes."""
    return (np.unpackbits(codes, axis=1).view(np.int8) << 1) - 1


def _below(values: np.ndarray, value: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) where values < value. Hits are rare, so a row minimum (one fast reduction) finds the rows that
    have any, and only those rows are compared and scanned."""
    rows = np.flatnonzero(np.minimum.reduce(values, axis=1) < value)
    if len(rows) * 4 > len(values):  # hits in many rows: compare the whole tile rather than copy those rows
        return np.divmod(np.flatnonzero(values < value), values.shape[1])
    r, c = np.divmod(np.flatnonzero(values[rows] < value), values.shape[1])
    return rows[r], c


def _faiss():
    """faiss, with as many OpenMP threads as torch has (the torch-threads setting): depending on import order the
    two share a pool or not, and idle threads of an unbounded one spin and starve the process's others. Its loader
    logs every instruction set it tries at INFO: quiet unless something fails."""
    if "faiss" not in sys.modules:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss
    import torch

    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def faiss_knn(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact heap top-k of ``codes`` for each query, on the arrays as they are (no index, no copy)."""
    faiss = _faiss()
    return faiss.knn_hamming(np.ascontiguousarray(queries), np.ascontiguousarray(codes), k)


def faiss_range(queries: np.ndarray, codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss's range search (distance < radius) of ``codes``: (query rows, distances, indices) of the hits, each
    query's in database order."""
    faiss = _faiss()
    queries, codes = np.ascontiguousarray(queries), np.ascontiguousarray(codes)
    result = faiss.RangeSearchResult(len(queries))
    faiss.hamming_range_search(faiss.swig_ptr(queries), faiss.swig_ptr(codes), len(queries), len(codes),
                               int(radius), codes.shape[1], result)
    lims = faiss.rev_swig_ptr(result.lims, len(queries) + 1).astype(np.int64)
    hits = int(lims[-1])
    distances = faiss.rev_swig_ptr(result.distances, hits).astype(np.int64)
    indices = faiss.rev_swig_ptr(result.labels, hits).astype(np.int64)
    return np.repeat(np.arange(len(queries)), np.diff(lims)), distances, indices


@functools.cache
def chosen_kernel(many: bool) -> str:
    """The kernel ``auto`` runs for fewer than (``many`` False) or at least ``MANY_QUERIES`` queries on this
    machine: each kernel times a top-10 over random 128-bit codes (about 10^6 pairs, one warm-up call that builds
    its layouts, best of three; a kernel whose warm-up takes 20 times faiss's is not timed further)."""
    from pipeline.device import cpu_flags

    rng = np.random.default_rng(0)
    queries, n = (256, 4096) if many else (4, 1 << 18)
    codes = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    probe = rng.integers(0, 256, (queries, 16), dtype=np.uint8)
    rates: dict[str, float] = {}
    for kernel in ("faiss", "popcount", "matmul"):
        index = BinaryIndex(128, kernel)
        index.add(codes)
        seconds = []
        for _ in range(4):
            started = time.perf_counter()
            index.search(probe, 10)
            seconds.append(time.perf_counter() - started)
            if kernel != "faiss" and seconds[0] * rates["faiss"] > 20 * queries * n:
                break
        rates[kernel] = queries * n / min(seconds[1:] or seconds)
    best = max(rates, key=rates.__getitem__)
    chosen = best if rates[best] > _FAISS_MARGIN * rates["faiss"] else "faiss"
    log.info("matching kernel chosen", extra={"fields": {
        "queries": f">= {MANY_QUERIES}" if many else f"< {MANY_QUERIES}", "kernel": chosen,
        "pairs_per_s": {k: float(f"{v:.3g}") for k, v in rates.items()}, "cpu_flags": cpu_flags()}})
    return chosen


def topk(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ``codes`` [N, W] of each of ``queries`` [Q, W] (packed uint8): (distances, indices)."""
    return _index(codes).search(queries, k)


def range_search(queries: np.ndarray, codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every code at Hamming distance < radius of each query: (lims, distances, indices), as faiss."""
    return _index(codes).range_search(queries, radius)


def _index(codes: np.ndarray) -> BinaryIndex:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise CodeError(f"codes must be 2-d [n, bytes], got shape {list(codes.shape)}")
    index = BinaryIndex(8 * codes.shape[1])
    index.add(codes)
    return index
