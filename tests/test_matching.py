"""Matching: exact search equal to faiss IndexBinaryFlat, standing queries, the hit merger and the archive."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus.records import InvalidQuery, MomentCode, StandingQuery
from pipeline.codes.packing import CodeError, hamming
from pipeline.matching import archive as archive_module, matcher
from pipeline.matching.archive import MomentArchive
from pipeline.matching.matcher import BinaryIndex, range_search, topk
from pipeline.matching.standing import Hit, HitMerger, StandingQueries, temporal_iou

KERNELS = ["faiss", "popcount", "matmul"]


def _random_codes(rng, n, nbytes, distinct=256):
    """Codes with bytes drawn from ``distinct`` values: few values give many exact ties."""
    return rng.integers(0, distinct, size=(n, nbytes), dtype=np.uint8)


def _faiss(codes):
    index = faiss.IndexBinaryFlat(8 * codes.shape[1])
    index.add(codes)
    return index


@pytest.fixture(autouse=True)
def one_faiss_thread():
    faiss.omp_set_num_threads(1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nbytes, n, q, k, distinct", [
    (16, 7000, 40, 10, 256),  # several tiles of both kernels
    (16, 7000, 20, 100, 2),  # heavy ties
    (8, 3000, 20, 1000, 2),  # k larger than a tile
    (4, 10, 5, 20, 4),  # k > N: padded like faiss
    (3, 500, 7, 7, 256),  # a width that is not a whole number of words
    (32, 5000, 70, 5, 256),  # 256 bits
    (16, 1, 3, 2, 256),
])
def test_topk_equals_faiss(kernel, nbytes, n, q, k, distinct):
    rng = np.random.default_rng(n + q + k)
    codes, queries = _random_codes(rng, n, nbytes, distinct), _random_codes(rng, q, nbytes, distinct)
    expected = _faiss(codes).search(queries, k)
    index = BinaryIndex(8 * nbytes, kernel)
    index.add(codes)
    distances, indices = index.search(queries, k)
    assert distances.dtype == np.int32 and indices.dtype == np.int64
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(indices, expected[1])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("radius", [0, 1, 50, 60, 64, 200])
def test_range_search_equals_faiss(kernel, radius):
    rng = np.random.default_rng(radius)
    codes, queries = _random_codes(rng, 5000, 16, 4), _random_codes(rng, 30, 16, 4)
    lims, distances, indices = _faiss(codes).range_search(queries, radius)
    index = BinaryIndex(128, kernel)
    index.add(codes)
    ours = index.range_search(queries, radius)
    np.testing.assert_array_equal(ours[0], lims)
    np.testing.assert_array_equal(ours[1], distances)
    np.testing.assert_array_equal(ours[2], indices)


@pytest.mark.parametrize("kernel", KERNELS)
def test_range_search_with_a_radius_per_code(kernel):
    rng = np.random.default_rng(8)
    codes, queries = _random_codes(rng, 3000, 16), _random_codes(rng, 40, 16)
    radii = rng.integers(0, 129, len(codes))
    index = BinaryIndex(128, kernel)
    index.add(codes)
    lims, distances, indices = index.range_search(queries, radii)
    full = hamming(queries, codes)
    for q in range(len(queries)):
        expected = np.flatnonzero(full[q] < radii)
        np.testing.assert_array_equal(indices[lims[q]:lims[q + 1]], expected)
        np.testing.assert_array_equal(distances[lims[q]:lims[q + 1]], full[q, expected])
    with pytest.raises(ValueError, match="per-code radii"):
        index.range_search(queries, radii[:-1])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 60), st.sampled_from([1, 2, 3, 8, 16]),
       st.sampled_from([2, 3, 256]), st.sampled_from(KERNELS), st.integers(0, 2**32 - 1))
def test_topk_and_range_equal_faiss_on_random_shapes(n, q, k, nbytes, distinct, kernel, seed):
    rng = np.random.default_rng(seed)
    codes, queries = _random_codes(rng, n, nbytes, distinct), _random_codes(rng, q, nbytes, distinct)
    index = BinaryIndex(8 * nbytes, kernel)
    index.add(codes)
    reference = _faiss(codes)
    for ours, theirs in zip(index.search(queries, k), reference.search(queries, k)):
        np.testing.assert_array_equal(ours, theirs)
    radius = int(rng.integers(0, 8 * nbytes + 2))
    for ours, theirs in zip(index.range_search(queries, radius), reference.range_search(queries, radius)):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compaction_keeps_results_exact(kernel, monkeypatch):
    monkeypatch.setattr(matcher, "_COMPACT_BUDGET", 1)  # compact after every tile
    rng = np.random.default_rng(5)
    codes, queries = _random_codes(rng, 20000, 16, 3), _random_codes(rng, 17, 16, 3)
    index = BinaryIndex(128, kernel)
    index.add(codes)
    for ours, theirs in zip(index.search(queries, 3), _faiss(codes).search(queries, 3)):
        np.testing.assert_array_equal(ours, theirs)


def test_auto_kernel_is_calibrated_once_and_logged_with_the_cpu(caplog):
    matcher.chosen_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger=matcher.__name__):
        kernel = matcher.chosen_kernel(many=True)
        assert matcher.chosen_kernel(many=True) == kernel  # cached: timed once per process
    assert kernel in KERNELS
    (record,) = [r for r in caplog.records if r.getMessage() == "matching kernel chosen"]
    assert set(record.fields["pairs_per_s"]) == set(KERNELS) and record.fields["kernel"] == kernel
    assert "simd" in record.fields["cpu_flags"] and record.fields["cpu_flags"]["cpu"]


def test_index_grows_and_functions_agree():
    rng = np.random.default_rng(2)
    first, second, queries = _random_codes(rng, 300, 16), _random_codes(rng, 200, 16), _random_codes(rng, 30, 16)
    index = BinaryIndex(128)
    index.add(first)
    index.search(queries, 5)  # builds the layouts, which the next add must refresh
    index.add(second)
    both = np.concatenate([first, second])
    for ours, theirs in zip(index.search(queries, 5), topk(queries, both, 5)):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in zip(index.range_search(queries, 50), range_search(queries, both, 50)):
        np.testing.assert_array_equal(ours, theirs)
    assert index.ntotal == 500


def test_empty_index_and_no_queries():
    index = BinaryIndex(64)
    distances, indices = index.search(np.zeros((2, 8), np.uint8), 3)
    assert (distances == matcher.MISSING_DISTANCE).all() and (indices == -1).all()
    lims, distances, indices = index.range_search(np.zeros((2, 8), np.uint8), 10)
    assert list(lims) == [0, 0, 0] and len(distances) == len(indices) == 0
    index.add(np.zeros((4, 8), np.uint8))
    assert index.search(np.zeros((0, 8), np.uint8), 3)[0].shape == (0, 3)


def test_bad_arguments_are_rejected():
    index = BinaryIndex(128)
    with pytest.raises(CodeError, match="uint8"):
        index.add(np.zeros((3, 16), np.int64))
    with pytest.raises(CodeError, match=r"\[n, 16\]"):
        index.search(np.zeros((3, 8), np.uint8), 1)
    with pytest.raises(ValueError, match="positive"):
        index.search(np.zeros((3, 16), np.uint8), 0)
    with pytest.raises(CodeError, match="multiple of 8"):
        BinaryIndex(12)
    with pytest.raises(ValueError, match="kernel"):
        BinaryIndex(128, "gpu")


# standing queries


def _code(rng, bits=64):
    return rng.integers(0, 256, bits // 8, dtype=np.uint8)


def _flip(code, nbits, rng):
    """``code`` with ``nbits`` distinct bits flipped: at Hamming distance exactly nbits."""
    bits = np.unpackbits(code)
    bits[rng.choice(len(bits), nbits, replace=False)] ^= 1
    return np.packbits(bits)


def _query(query_id, code, threshold, text="q"):
    return StandingQuery(query_id, text, code, 8 * len(code), threshold, 0.0, "m")


def _moment(code, stream="cam", start=0, end=5, capture=100.0):
    return MomentCode(stream, start, end, code, 8 * len(code), capture, capture + 0.1, "m")


def test_standing_queries_match_with_their_own_thresholds():
    rng = np.random.default_rng(0)
    a, b = _code(rng), _code(rng)
    queries = StandingQueries(64, "m")
    queries.add(_query("a", a, 3))
    queries.add(_query("b", b, 10))
    moments = [_moment(_flip(a, 3, rng), start=0), _moment(_flip(a, 4, rng), start=1),
               _moment(_flip(b, 10, rng), start=2), _moment(_flip(b, 11, rng), start=3)]
    hits = queries.match(moments)
    assert [(h.query_id, h.start, h.distance) for h in hits] == [("a", 0, 3), ("b", 2, 10)]
    assert hits[0].capture_time == 100.0 and hits[0].stream_id == "cam"


def test_standing_queries_update_and_delete():
    rng = np.random.default_rng(1)
    codes = {name: _code(rng) for name in "abcd"}
    queries = StandingQueries(64)
    for name, code in codes.items():
        queries.add(_query(name, code, 0))
    moment = [_moment(codes["c"])]
    assert [h.query_id for h in queries.match(moment)] == ["c"]
    queries.add(_query("a", codes["c"], 0))  # update: a now looks for c's code
    assert [h.query_id for h in queries.match(moment)] == ["a", "c"]
    assert queries.delete("c") and not queries.delete("c")
    assert "c" not in queries and len(queries) == 3 and set(queries) == {"a", "b", "d"}
    assert [h.query_id for h in queries.match(moment)] == ["a"]
    assert [h.query_id for h in queries.match([_moment(codes["d"])])] == ["d"]  # the moved row still matches
    queries.delete("a"), queries.delete("b"), queries.delete("d")
    assert queries.match(moment) == [] and len(queries) == 0


def test_standing_queries_match_a_batch_against_brute_force():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (50, 16), dtype=np.uint8)
    thresholds = rng.integers(40, 64, 50)
    queries = StandingQueries(128)
    for i in rng.permutation(50):  # registration order must not matter
        queries.add(_query(f"q{i:02d}", codes[i], int(thresholds[i])))
    moment_codes = rng.integers(0, 256, (300, 16), dtype=np.uint8)
    moments = [_moment(c, start=i, end=i + 3) for i, c in enumerate(moment_codes)]
    distances = hamming(moment_codes, codes)
    expected = sorted((f"q{q:02d}", int(m)) for m, q in zip(*np.nonzero(distances <= thresholds)))
    assert sorted((h.query_id, h.start) for h in queries.match(moments)) == expected
    assert expected  # the thresholds were chosen so that some pairs match


def test_standing_queries_reject_codes_of_another_space():
    queries = StandingQueries(64, "m")
    with pytest.raises(InvalidQuery, match="no code"):
        queries.add(StandingQuery("q", "text only", None, 0, 3, 0.0))
    with pytest.raises(InvalidQuery, match="128-bit"):
        queries.add(_query("q", np.zeros(16, np.uint8), 3))
    queries.add(_query("q", np.zeros(8, np.uint8), 3))
    with pytest.raises(CodeError, match="model 'other'"):
        queries.match([MomentCode("cam", 0, 1, np.zeros(8, np.uint8), 64, 0.0, 0.0, "other")])


# the hit merger


def _hit(start, end, distance, query="q", stream="cam"):
    return Hit(query, stream, start, end, distance, float(end))


def _feed(merger, hits, until, stream="cam"):
    """Feed hits second by second, as the encoder makes candidates final; return everything published."""
    out = []
    for now in range(until + 1):
        out += merger.update(stream, now, [h for h in hits if h.end == now])
    return out


def test_candidates_of_one_moment_give_one_event_with_the_best_hit():
    # a moment around seconds 10-16 seen by candidates of several scales, ending at different seconds
    hits = [_hit(10, 15, 9), _hit(9, 16, 7), _hit(10, 16, 5), _hit(11, 17, 8), _hit(8, 18, 9)]
    events = _feed(HitMerger(settle=4, min_iou=0.3), hits, 40)
    assert events == [_hit(10, 16, 5)]


def test_equal_hits_publish_the_earliest():
    assert _feed(HitMerger(settle=3), [_hit(10, 15, 5), _hit(11, 16, 5), _hit(10, 16, 5)], 30) == [_hit(10, 15, 5)]


def test_two_moments_far_apart_give_two_events():
    hits = [_hit(10, 15, 9), _hit(10, 16, 6), _hit(40, 44, 8), _hit(41, 45, 7)]
    events = _feed(HitMerger(settle=3), hits, 60)
    assert events == [_hit(10, 16, 6), _hit(41, 45, 7)]


def test_queries_and_streams_are_merged_separately():
    hits = [_hit(10, 15, 9, query="a"), _hit(10, 15, 4, query="b")]
    events = _feed(HitMerger(settle=2), hits, 30)
    assert sorted(e.query_id for e in events) == ["a", "b"]
    merger = HitMerger(settle=2)
    assert _feed(merger, [_hit(3, 6, 1, stream="x")], 20, "x") == [_hit(3, 6, 1, stream="x")]
    with pytest.raises(ValueError, match="fed as stream"):
        merger.update("y", 5, [_hit(3, 6, 1, stream="x")])


def test_event_waits_for_the_settle_window_and_no_longer():
    merger = HitMerger(settle=3)
    assert merger.update("cam", 15, [_hit(10, 15, 9)]) == []
    assert merger.update("cam", 16, [_hit(10, 16, 4)]) == []
    assert merger.update("cam", 17) == []
    assert merger.update("cam", 18) == [_hit(10, 16, 4)]  # 15 + 3: published even if better hits may follow
    assert merger.update("cam", 19, [_hit(11, 19, 1)]) == []  # overlaps the published event: suppressed
    assert _feed(merger, [], 40) == []


def test_a_query_fires_once_per_happening():
    # a long moment matched by candidates on its first half, then on its second: one event
    merger = HitMerger(settle=0)
    assert merger.update("cam", 10, [_hit(5, 10, 3)]) == [_hit(5, 10, 3)]
    assert merger.update("cam", 14, [_hit(8, 14, 2)]) == []  # IoU 2/9 with the published event
    assert merger.update("cam", 30, [_hit(25, 30, 2)]) == [_hit(25, 30, 2)]  # apart: another happening
    assert merger.update("cam", 40, [_hit(30, 40, 2)]) == [_hit(30, 40, 2)]  # touching is not overlapping


def test_a_late_hit_that_overlaps_less_than_repeat_iou_is_a_new_event():
    merger = HitMerger(settle=0, min_iou=0.5, repeat_iou=0.5)
    assert merger.update("cam", 10, [_hit(5, 10, 3)]) == [_hit(5, 10, 3)]
    assert merger.update("cam", 14, [_hit(8, 14, 2)]) == [_hit(8, 14, 2)]  # IoU 2/9 < 0.5


def test_flush_publishes_open_clusters():
    merger = HitMerger(settle=10)
    merger.update("cam", 5, [_hit(0, 5, 3)])
    assert merger.flush("cam") == [_hit(0, 5, 3)]
    assert merger.flush("cam") == [] and merger.flush("never-seen") == []


def test_merger_is_deterministic_whatever_the_order_within_a_batch():
    rng = np.random.default_rng(3)
    hits = [_hit(int(e) - int(k), int(e), int(d), query=f"q{int(q)}")
            for e, k, d, q in zip(rng.integers(5, 200, 300), rng.integers(1, 20, 300), rng.integers(0, 30, 300),
                                  rng.integers(0, 3, 300))]
    hits = [h for h in hits if h.start >= 0]
    straight = _feed(HitMerger(settle=4), hits, 600)  # past every published event's horizon
    shuffled, out = HitMerger(settle=4), []
    for now in range(601):
        batch = [h for h in hits if h.end == now]
        rng.shuffle(batch)
        out += shuffled.update("cam", now, batch)
    assert out == straight
    assert len(straight) < len(hits) / 2  # overlapping hits were merged
    for query in ("q0", "q1", "q2"):
        events = [e for e in straight if e.query_id == query]
        assert all(temporal_iou(a, b) < 0.05 for i, a in enumerate(events) for b in events[i + 1:])
    assert shuffled.streams() == []  # all settled and forgotten: the state stays bounded


def test_merger_rejects_bad_parameters():
    with pytest.raises(ValueError, match="min_iou"):
        HitMerger(min_iou=0)
    with pytest.raises(ValueError, match="repeat_iou"):
        HitMerger(repeat_iou=1.5)
    with pytest.raises(ValueError, match="settle"):
        HitMerger(settle=-1)


def test_temporal_iou():
    assert temporal_iou(_hit(0, 10, 0), _hit(5, 15, 0)) == pytest.approx(5 / 15)
    assert temporal_iou(_hit(0, 10, 0), _hit(10, 15, 0)) == 0


# the archive


def _moments(rng, n, streams=("a", "b"), t0=1000.0, bits=64):
    return [MomentCode(streams[i % len(streams)], i, i + 4, rng.integers(0, 256, bits // 8, dtype=np.uint8), bits,
                       t0 + i, t0 + i + 0.1) for i in range(n)]


def test_archive_search_matches_brute_force_in_a_time_range():
    rng = np.random.default_rng(4)
    moments = _moments(rng, 500)
    archive = MomentArchive(64, capacity=1000)
    archive.add(moments[:200])
    archive.add(moments[200:])
    query = rng.integers(0, 256, 8, dtype=np.uint8)
    hits = archive.search(query, since=1100.0, until=1300.0, top_k=7)
    inside = [m for m in moments if 1100.0 <= m.capture_time <= 1300.0]
    expected = sorted(inside, key=lambda m: (int(hamming(query[None], m.code[None])[0, 0]), -m.capture_time))[:7]
    assert [(h.stream_id, h.start, h.end, h.capture_time) for h in hits] == \
        [(m.stream_id, m.start, m.end, m.capture_time) for m in expected]
    assert [h.distance for h in hits] == [int(hamming(query[None], m.code[None])[0, 0]) for m in expected]


def test_archive_keeps_only_the_newest_capacity_moments():
    rng = np.random.default_rng(5)
    moments = _moments(rng, 250)
    archive = MomentArchive(64, capacity=100)
    for i in range(0, 250, 30):
        archive.add(moments[i:i + 30])
    assert len(archive) == 100
    hits = archive.search(moments[120].code, top_k=200)
    assert len(hits) == 100 and min(h.start for h in hits) == 150
    assert archive.search(moments[200].code, top_k=1)[0].start == 200


def test_archive_drops_moments_older_than_max_age():
    rng = np.random.default_rng(6)
    archive = MomentArchive(64, capacity=1000, max_age=60.0)
    archive.add(_moments(rng, 100))  # capture times 1000..1099
    assert len(archive) == 61
    assert min(h.capture_time for h in archive.search(np.zeros(8, np.uint8), top_k=1000)) == 1039.0


def test_archive_ties_prefer_the_newest_and_bad_codes_are_rejected():
    archive = MomentArchive(64, capacity=10)
    code = np.zeros(8, np.uint8)
    archive.add([MomentCode("cam", i, i + 1, code, 64, 1000.0 + i, 0.0) for i in range(5)])
    assert [h.start for h in archive.search(code, top_k=3)] == [4, 3, 2]
    with pytest.raises(CodeError):
        archive.search(np.zeros(16, np.uint8))
    with pytest.raises(CodeError):
        archive.add([MomentCode("cam", 0, 1, np.zeros(16, np.uint8), 128, 0.0, 0.0)])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.integers(1, 50), st.sampled_from([2, 3, 256]), st.integers(1, 30),
       st.sampled_from([None, 40.0, 200.0]), st.sampled_from([0, 3, 4096]), st.integers(0, 2**32 - 1))
def test_archive_search_equals_brute_force_across_blocks(n, capacity_blocks, distinct, k, max_age, outside, seed):
    """Blocks of 16 moments, capture times out of order, heavy ties, no extra candidates (so blocks with more ties
    at the k-th distance are searched again), blocks cut by the range scanned as spans or copied out: the documented
    ranking (distance, capture time newest first, newest archived first) over what capacity and age keep, whatever
    the range."""
    rng = np.random.default_rng(seed)
    capacity = 16 * capacity_blocks // 3 + 1
    times = 1000.0 + np.arange(n) * 0.5 + rng.integers(-4, 5, n)  # about capture order, 12 moments a second
    codes = _random_codes(rng, n, 4, distinct)
    moments = [MomentCode(f"s{i % 3}", i, i + 1 + i % 7, codes[i], 32, float(times[i]), 0.0) for i in range(n)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(archive_module, "BLOCK", 16)
        patch.setattr(archive_module, "_EXTRA", 0)
        archive = MomentArchive(32, capacity=capacity, max_age=max_age)
        for i in range(0, n, 37):
            archive.add(moments[i:i + 37])
    kept = list(enumerate(moments))[-capacity:]
    if max_age is not None:
        kept = [(i, m) for i, m in kept if m.capture_time >= times.max() - max_age]
    assert len(archive) == len(kept)
    query = _random_codes(rng, 1, 4, distinct)[0]
    since, until = sorted(rng.uniform(995.0, 1010.0 + n * 0.5, 2))
    for low, high in ((None, None), (since, until), (since, None)):
        inside = [(i, m) for i, m in kept if (low is None or m.capture_time >= low)
                  and (high is None or m.capture_time <= high)]
        expected = sorted(inside, key=lambda im: (int(hamming(query[None], im[1].code[None])[0, 0]),
                                                  -im[1].capture_time, -im[0]))[:k]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(archive_module, "_EXTRA", 0)
            patch.setattr(archive_module, "_MAX_OUTSIDE", outside)
            hits = archive.search(query, since=low, until=high, top_k=k)
        assert [(h.stream_id, h.start, h.end, h.capture_time) for h in hits] == \
            [(m.stream_id, m.start, m.end, m.capture_time) for _, m in expected]
        assert [h.distance for h in hits] == [int(hamming(query[None], m.code[None])[0, 0]) for _, m in expected]


def test_archive_ties_at_the_kth_distance_beyond_a_blocks_candidates(monkeypatch):
    monkeypatch.setattr(archive_module, "BLOCK", 16)
    monkeypatch.setattr(archive_module, "_EXTRA", 0)
    code = np.zeros(4, np.uint8)
    archive = MomentArchive(32, capacity=100)
    archive.add([MomentCode("cam", i, i + 1, code, 32, 1000.0 + i // 2, 0.0) for i in range(64)])
    # every block's faiss top-5 are its first rows; the newest are the last rows of the last block
    assert [h.start for h in archive.search(code, top_k=5)] == [63, 62, 61, 60, 59]


def test_archive_memory_is_its_columns_allocated_block_by_block(monkeypatch):
    monkeypatch.setattr(archive_module, "BLOCK", 1000)
    rng = np.random.default_rng(9)
    archive = MomentArchive(128, capacity=2500, max_age=None)
    assert archive.bytes_per_moment == 34 and archive.nbytes == 0  # 16 bytes of code, 18 of metadata
    archive.add(_moments(rng, 10, bits=128))
    assert archive.nbytes == 1000 * 34
    archive.add(_moments(rng, 2500, bits=128))
    archive.add(_moments(rng, 1500, bits=128))  # the newest 2500 of 4010 are kept: the first block is freed
    assert len(archive) == 2500 and archive.nbytes == 4 * 1000 * 34
    with pytest.raises(ValueError, match="spans"):
        archive.add([MomentCode("cam", 0, 70_000, np.zeros(16, np.uint8), 128, 0.0, 0.0)])
