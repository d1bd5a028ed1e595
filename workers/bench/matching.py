"""`matching`: our exact Hamming search against faiss-cpu ``IndexBinaryFlat``, one thread each.

Cases over random codes (uniform bits, the hardest case for any pruning):
- ``topk``: the k nearest of ``codes`` database codes for each of ``queries`` queries (``BinaryIndex.search``);
- ``range``: every code below a radius chosen to give about ``hits`` codes per query (``BinaryIndex.range_search``);
- ``standing``: the query worker's direction, a stream of moment codes in poll-sized batches against ``standing``
  registered queries with their own thresholds (``StandingQueries.match``); the reference range-searches a faiss
  index of the query codes at the largest threshold, keeps each query's own, and builds the same sorted hits;
- ``archive-range`` and ``archive-day``: retrospective search, the top-``k`` of ``searches`` codes one request at a
  time over an archive of ``archive`` moments (a day of 16 lite streams, 12 moments a second each), within the last
  ``window_hours`` and over all of it (``MomentArchive.search``). The reference holds the same codes newest first
  (its ties go to the lower index, the archive's to the newest) and searches them with an ``IDSelectorRange`` of the
  moments in the window, the way faiss filters a search; the results must be the same moments. The archive's
  memory per moment is reported with it.
The unit is code pairs compared per second (for the archive, pairs within the time range); queries, moments and
matches per second are reported beside it, and the machine's CPU flags with the report.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

from workers.bench.runner import Case, Verdict

NAME = "matching"
TITLE = "exact Hamming top-k, range search and standing queries against faiss IndexBinaryFlat, one thread each"
REFERENCE = "faiss-cpu IndexBinaryFlat (search, range_search), faiss.omp_set_num_threads(1)"
UNIT = "comparisons/s"  # (query, code) pairs
TARGET = 1.0
REPEATS = 5
WARMUP = 1


@dataclass(frozen=True)
class Params:
    codes: int = field(default=1_000_000, metadata={"help": "database codes"})
    queries: int = field(default=1000, metadata={"help": "queries per top-k or range search call"})
    bits: int = field(default=128, metadata={"help": "code length"})
    k: int = field(default=10, metadata={"help": "neighbours per query in top-k"})
    hits: float = field(default=30.0, metadata={"help": "range search: the radius gives at least this many "
                                                        "expected hits per query"})
    standing: int = field(default=10_000, metadata={"help": "registered standing queries"})
    moments: int = field(default=10_000, metadata={"help": "moment codes matched per standing-queries call"})
    batch: int = field(default=500, metadata={"help": "moments per match call (a poll of the query worker)"})
    threshold: int = field(default=38, metadata={"help": "largest standing-query threshold; thresholds are "
                                                         "drawn from threshold-4..threshold"})
    archive: int = field(default=17_000_000, metadata={"help": "moments in the archive of the archive cases"})
    window_hours: float = field(default=1.0, metadata={"help": "archive-range: the last this many hours"})
    searches: int = field(default=20, metadata={"help": "archive searches per timed call, one request each"})
    seed: int = field(default=0, metadata={"help": "seed of the codes"})


def radius_for(hits: float, codes: int, bits: int) -> int:
    """The smallest radius whose expected hits per query among uniform random codes is at least ``hits``."""
    below = 0
    for radius in range(bits + 2):
        if codes * below / 2**bits >= hits:
            return radius
        below += math.comb(bits, radius)
    return bits + 1


def cases(params: Params, stack: ExitStack) -> list[Case]:
    import faiss
    import numpy as np
    import torch

    from pipeline.matching.matcher import BinaryIndex

    threads = torch.get_num_threads()
    stack.callback(torch.set_num_threads, threads)
    stack.callback(faiss.omp_set_num_threads, faiss.omp_get_max_threads())
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)

    rng = np.random.default_rng(params.seed)
    width = params.bits // 8
    codes = rng.integers(0, 256, (params.codes, width), dtype=np.uint8)
    queries = rng.integers(0, 256, (params.queries, width), dtype=np.uint8)
    ours = BinaryIndex(params.bits)
    ours.add(codes)
    theirs = faiss.IndexBinaryFlat(params.bits)
    theirs.add(codes)
    radius = radius_for(params.hits, params.codes, params.bits)
    pairs = params.codes * params.queries
    return [
        Case("topk", lambda: ours.search(queries, params.k), lambda: theirs.search(queries, params.k), pairs,
             lambda a, b: check_topk(a, b, codes, queries), amounts=lambda out: {"queries": params.queries},
             notes={"k": params.k}),
        Case("range", lambda: ours.range_search(queries, radius), lambda: theirs.range_search(queries, radius),
             pairs, check_range, amounts=lambda out: {"queries": params.queries, "hits": int(out[0][-1])},
             notes={"radius": radius, "expected_hits_per_query": params.hits}),
        standing_case(params, rng),
        *archive_cases(params, rng),
    ]


def check_topk(mine, theirs, codes, queries) -> Verdict:
    """Distances equal; indices equal except where equal distances allow another order or another code at the
    k-th distance, and then ours must be distinct codes at exactly the distance they claim."""
    import numpy as np

    from pipeline.codes.packing import as_words

    (distances, indices), (their_distances, their_indices) = mine, theirs
    if not np.array_equal(distances, their_distances):
        rows = np.flatnonzero((distances != their_distances).any(axis=1))
        return Verdict([f"distances differ for {len(rows)} queries, first query {rows[0]}"])
    other = indices != their_indices
    problems = []
    if other.any():
        q, j = np.nonzero(other)
        true = np.bitwise_count(as_words(codes[indices[q, j]]) ^ as_words(queries[q])).sum(axis=1)
        if not np.array_equal(true, distances[q, j]):
            problems.append("indices that differ from faiss's are not at the distance reported")
        if any(len(set(row)) < len(row) for row in indices[np.unique(q)]):
            problems.append("a query lists the same code twice")
    return Verdict(problems, {"queries compared": len(distances), "indices in another tie order": int(other.sum())})


def check_range(mine, theirs) -> Verdict:
    import numpy as np

    names = ("lims", "distances", "indices")
    problems = [f"{name} differ from faiss's" for name, a, b in zip(names, mine, theirs) if not np.array_equal(a, b)]
    return Verdict(problems, {"hits compared": len(theirs[1])})


def check_hits(mine: list, theirs: list) -> Verdict:
    if mine == theirs:
        return Verdict([], {"hits compared": len(theirs)})
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    return Verdict([f"{len(mine)} hits, faiss gives {len(theirs)}; first difference at hit {first}"])


def standing_case(params: Params, rng) -> Case:
    import faiss
    import numpy as np

    from pipeline.bus.records import MomentCode, StandingQuery
    from pipeline.matching.standing import Hit, StandingQueries

    width = params.bits // 8
    query_codes = rng.integers(0, 256, (params.standing, width), dtype=np.uint8)
    thresholds = rng.integers(max(0, params.threshold - 4), params.threshold + 1, params.standing)
    ids = [f"query-{i}" for i in range(params.standing)]
    registered = StandingQueries(params.bits)
    for query_id, code, threshold in zip(ids, query_codes, thresholds):
        registered.add(StandingQuery(query_id, None, code, params.bits, int(threshold), 0.0))
    moment_codes = rng.integers(0, 256, (params.moments, width), dtype=np.uint8)
    moments = [MomentCode(f"stream-{i % 64}", i // 64, i // 64 + 1 + i % 23, code, params.bits, float(i), float(i))
               for i, code in enumerate(moment_codes)]
    batches = [moments[i:i + params.batch] for i in range(0, len(moments), params.batch)]
    index = faiss.IndexBinaryFlat(params.bits)
    index.add(query_codes)

    def ours() -> list:
        return [hit for batch in batches for hit in registered.match(batch)]

    def reference() -> list:
        hits = []
        for batch in batches:
            lims, distances, rows = index.range_search(np.stack([m.code for m in batch]), int(thresholds.max()) + 1)
            keep = distances <= thresholds[rows]
            found = np.repeat(np.arange(len(batch)), np.diff(lims.astype(np.int64)))[keep]
            hits += sorted(Hit(ids[q], batch[m].stream_id, batch[m].start, batch[m].end, int(d), batch[m].capture_time)
                           for m, q, d in zip(found.tolist(), rows[keep].tolist(), distances[keep].tolist()))
        return hits

    return Case(
        "standing", ours, reference, params.standing * params.moments,
        check_hits,
        amounts=lambda out: {"moments": params.moments, "matches": len(out)},
        notes={"standing_queries": params.standing, "moments_per_batch": params.batch,
               "thresholds": [int(thresholds.min()), int(thresholds.max())]},
    )


ARCHIVE_RATE = 16 * 12  # moments a second: 16 lite streams
T0 = 1.7e9  # capture time of the archive's first moment


def archive_cases(params: Params, rng) -> list[Case]:
    """The archive filled with ``params.archive`` moments in capture order, ``ARCHIVE_RATE`` a second, and the two
    searches: within the last ``window_hours`` and over the day."""
    import faiss
    import numpy as np
    import psutil

    from pipeline.matching.archive import MomentArchive

    n, width, chunk = params.archive, params.bits // 8, 1 << 20
    codes = rng.integers(0, 256, (n, width), dtype=np.uint8)
    archive = MomentArchive(params.bits, capacity=n, max_age=None)
    names = [f"cam-{s:02d}" for s in range(16)]
    rss = psutil.Process().memory_info().rss
    for i in range(0, n, chunk):
        j = np.arange(i, min(i + chunk, n))
        archive.extend(codes[i:i + chunk], *_moment_fields(j), j % len(names), names)
    grown = psutil.Process().memory_info().rss - rss
    newest_first = faiss.IndexBinaryFlat(params.bits)
    newest_first.add(np.ascontiguousarray(codes[::-1]))
    queries = rng.integers(0, 256, (params.searches, width), dtype=np.uint8)
    del codes
    since = float(_moment_fields(np.array([n - 1]))[0][0]) - params.window_hours * 3600
    inside = n - min(n, int(np.ceil(since - T0)) * ARCHIVE_RATE)  # the newest moments, captured since `since`
    selector = faiss.SearchParameters(sel=faiss.IDSelectorRange(0, inside))
    memory = {"bytes_per_moment": archive.nbytes / len(archive), "rss_growth_per_moment": grown / n,
              "archive_bytes": archive.nbytes, "moments": len(archive)}

    def ours(low):
        return [archive.search(q, since=low, top_k=params.k) for q in queries]

    def reference(window):
        return [newest_first.search(q[None], params.k, params=window) for q in queries]

    def check(mine, theirs) -> Verdict:
        problems = [] if len(mine) == len(theirs) else [f"{len(mine)} searches answered, faiss {len(theirs)}"]
        for q, (hits, (distances, indices)) in enumerate(zip(mine, theirs)):
            order = n - 1 - indices[0]
            times, starts, _ = _moment_fields(order)
            expected = [(names[i % len(names)], int(s), int(d), float(t))
                        for i, s, d, t in zip(order, starts, distances[0], times)]
            if [(h.stream_id, h.start, h.distance, h.capture_time) for h in hits] != expected:
                problems.append(f"search {q}: other moments than faiss's")
        return Verdict(problems[:3], {"searches compared": len(mine)})

    amounts = {"searches": params.searches}
    return [
        Case("archive-range", lambda: ours(since), lambda: reference(selector), params.searches * inside, check,
             amounts=lambda out: amounts, notes={"window_hours": params.window_hours, "moments_in_window": inside,
                                                 **memory}),
        Case("archive-day", lambda: ours(None), lambda: reference(None), params.searches * n, check,
             amounts=lambda out: amounts, notes={"hours": round(n / ARCHIVE_RATE / 3600, 1), **memory}),
    ]


def _moment_fields(i):
    """Capture times, starts and ends of moments number ``i`` of the archive case."""
    second = i // ARCHIVE_RATE
    return T0 + second.astype(float), second, second + 1 + i % 12
