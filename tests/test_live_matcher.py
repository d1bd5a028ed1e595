"""The query worker's logic: standing queries, batching-independent events, replay, search (fake text encoder)."""

import numpy as np
import pytest

from pipeline.bus.records import BAD_QUERY, MomentCode, StandingQuery, decode_moments, encode
from pipeline.matching.live import FOREIGN_CODE, LiveMatcher
from pipeline.partitions import Origin

BITS = 32


def fake_encoder(texts):
    """A stand-in for sentence encoder + QEN: the code is the text's first four bytes."""
    return np.stack([np.frombuffer(t.encode()[:4].ljust(4, b" "), np.uint8) for t in texts])


def matcher(**kw):
    return LiveMatcher(BITS, "m1", fake_encoder, clock=lambda: 100.0, **kw)


def moment(stream, start, end, code, capture=50.0, model="m1", session="", last=False):
    return MomentCode(stream, start, end, np.asarray(code, np.uint8), BITS, capture, capture, model, session, last)


def columns(moments):
    """Moments as a restore reads them from the log."""
    return decode_moments([encode(m) for m in moments], BITS)


def query(query_id, text=None, code=None, threshold=0):
    if code is None:
        return StandingQuery(query_id, text, None, 0, threshold, 1.0)
    return StandingQuery(query_id, text, np.asarray(code, np.uint8), BITS, threshold, 1.0)


def stream_moments(rng, stream="s", seconds=40):
    """Candidates (x - k, x) of lengths 1..6 per second, random codes with a planted moment at 10-16."""
    out = []
    for x in range(1, seconds + 1):
        for k in range(1, min(6, x) + 1):
            code = rng.integers(0, 256, 4)
            if abs(x - 16) <= 1 and abs(k - 6) <= 1:
                code = np.frombuffer(b"red ", np.uint8) ^ np.array([0, 0, 0, (x, k) != (16, 6)], np.uint8)
            out.append(moment(stream, x - k, x, code, capture=float(x)))
    return out


def events_of(events):
    return [(e.query_id, e.stream_id, e.start, e.end, e.distance) for e in events]


def test_text_queries_are_encoded_and_tombstones_delete():
    m = matcher()
    assert m.apply_queries([("a", query("a", "red circle", threshold=2)), ("b", query("b", "blue", threshold=1))]) == []
    assert set(m.queries) == {"a", "b"}
    assert m.queries.get("a").code.tobytes() == b"red "
    m.apply_queries([("a", None)])
    assert "a" not in m.queries and "b" in m.queries


def test_a_bad_query_is_an_error_record_and_the_others_stay():
    m = matcher()
    errors = m.apply_queries([("wide", query("wide", code=[0, 0, 0, 0], threshold=0)),
                              ("bad", StandingQuery("bad", None, np.zeros(8, np.uint8), 64, 3, 1.0))])
    assert [e.kind for e in errors] == [BAD_QUERY]
    assert "wide" in m.queries and "bad" not in m.queries


def test_events_do_not_depend_on_batching():
    rng = np.random.default_rng(0)
    moments = stream_moments(rng) + stream_moments(rng, "t")
    moments.sort(key=lambda mo: (mo.end, mo.stream_id))
    whole, pieces = matcher(), matcher()
    for m in (whole, pieces):
        m.apply_queries([("red", query("red", "red ", threshold=1))])
    at_once, _ = whole.process(moments)
    one_by_one = [e for mo in moments for e in pieces.process([mo])[0]]
    assert events_of(at_once) == events_of(one_by_one)
    assert {(e[1], e[2], e[3]) for e in events_of(at_once)} == {("s", 10, 16), ("t", 10, 16)}  # one per moment


def test_a_better_hit_in_the_second_a_cluster_is_due_wins_however_it_is_batched():
    """Cluster of (7, 12) is due at 12 + settle = 15; a better hit ending at 15 still joins it, in any batching."""
    hits = [moment("s", 7, 12, list(b"red!")), moment("s", 8, 15, list(b"red "))]
    fillers = [moment("s", x - 1, x, [0, 0, 0, 0]) for x in range(13, 17)]
    ordered = sorted(hits + fillers, key=lambda mo: mo.end)
    results = []
    for batches in ([ordered], [[mo] for mo in ordered]):
        m = matcher()
        m.apply_queries([("red", query("red", "red ", threshold=1))])
        events = [e for batch in batches for e in m.process(batch)[0]]
        results.append(events + m.process([moment("s", 30, 31, [0, 0, 0, 0])])[0])
    assert events_of(results[0]) == events_of(results[1]) == [("red", "s", 8, 15, 0)]


def test_replay_rebuilds_the_merger_exactly():
    rng = np.random.default_rng(1)
    moments = stream_moments(rng)
    reference, restarted = matcher(), matcher()
    for m in (reference, restarted):
        m.apply_queries([("red", query("red", "red ", threshold=1))])
    cut = next(i for i, mo in enumerate(moments) if mo.end == 16)  # inside the settle window of the planted moment
    before, _ = reference.process(moments[:cut])
    after, _ = reference.process(moments[cut:])
    restarted.process(moments[:cut], emit=False)
    replayed, _ = restarted.process(moments[cut:])
    assert events_of(replayed) == events_of(after) and len(after) == 1
    assert before == []


def test_moments_of_another_model_are_reported_not_matched():
    m = matcher()
    m.apply_queries([("q", query("q", code=[1, 2, 3, 4], threshold=0))])
    events, errors = m.process([moment("s", 0, 1, [1, 2, 3, 4], model="other")])
    assert events == [] and [e.kind for e in errors] == [FOREIGN_CODE]


def test_search_by_text_over_a_time_range():
    m = matcher()
    m.process([moment("s", 0, 2, list(b"red "), capture=10.0), moment("s", 5, 7, list(b"red!"), capture=20.0),
               moment("t", 0, 3, [0, 0, 0, 0], capture=30.0)])
    hits = m.search("red ", top_k=2)
    assert [(h.stream_id, h.start, h.distance) for h in hits] == [("s", 0, 0), ("s", 5, 1)]
    assert [h.start for h in m.search("red ", since=15.0, top_k=1)] == [5]
    with pytest.raises(ValueError):
        m.search("   ")


def test_a_complete_second_settles_at_once_however_it_is_batched():
    """With the number of moments per second known, a cluster due at second 12 is published with second 12's
    last moment, not when second 13 arrives; split or whole, the same events."""
    def complete(second):
        return 2

    second_12 = [moment("s", 6, 12, list(b"red ")), moment("s", 11, 12, [0, 0, 0, 0])]
    for batches in ([second_12], [[second_12[0]], [second_12[1]]]):
        m = LiveMatcher(BITS, "m1", fake_encoder, settle=0, moments_per_second=complete, clock=lambda: 100.0)
        m.apply_queries([("red", query("red", "red ", threshold=0))])
        events = [events_of(m.process(batch)[0]) for batch in batches]
        assert events[-1] == [("red", "s", 6, 12, 0)] and not any(events[:-1])


def picky_encoder(texts):
    """Refuses long texts, as the sentence encoder refuses more than its token window."""
    if any(len(t) > 20 for t in texts):
        raise ValueError("text of 300 tokens exceeds the encoder's 256-token window")
    return fake_encoder(texts)


def test_a_query_the_encoder_refuses_is_an_error_record_and_the_batch_goes_on():
    m = LiveMatcher(BITS, "m1", picky_encoder, clock=lambda: 100.0)
    m.apply_queries([("long", query("long", "red", threshold=1))])
    errors = m.apply_queries([("ok", query("ok", "red ", threshold=1)), ("long", query("long", "漢" * 1000))])
    assert [(e.kind, e.source) for e in errors] == [(BAD_QUERY, "long")] and "token window" in errors[0].message
    assert set(m.queries) == {"ok"}  # the unusable replacement does not leave the old query in place


def test_archives_are_per_partition_and_restores_replace_them():
    m = matcher(archive_size=3)
    p0, p1 = ("moments", 0), ("moments", 1)
    a = [moment("a", i, i + 1, list(b"red "), capture=float(i)) for i in range(5)]
    b = [moment("b", i, i + 1, list(b"red!"), capture=float(i)) for i in range(2)]
    for _ in range(3):  # any number of reassignments, no duplicates
        m.restore(p0, [columns(a)])
        m.restore(p1, [columns(b[:1]), columns(b[1:])])
    hits = m.search(code=list(b"red "), top_k=100)
    assert sorted((h.stream_id, h.start) for h in hits) == [("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 1)]
    assert m.held_partitions() == [p0, p1]
    m.process([moment("b", 2, 3, list(b"red!"), capture=9.0)], [Origin("moments", 1, 7)])
    m.forget([p0])
    assert m.held_partitions() == [p1]
    assert sorted((h.stream_id, h.start) for h in m.search(code=list(b"red "), top_k=100)) == [
        ("b", 0), ("b", 1), ("b", 2)]


def test_a_stream_that_ends_mid_cluster_publishes_it_at_once_and_is_freed():
    m = matcher(settle=3)
    m.apply_queries([("red", query("red", "red ", threshold=0))])
    events, _ = m.process([moment("s", 0, 4, list(b"red ")), moment("s", 3, 5, [0, 0, 0, 0], last=True)])
    assert events_of(events) == [("red", "s", 0, 4, 0)]
    assert m.merger.streams() == [] and len(m) == 0


def test_a_new_session_flushes_the_old_one():
    m = matcher(settle=3)
    m.apply_queries([("red", query("red", "red ", threshold=0))])
    events, _ = m.process([moment("s", 5, 9, list(b"red "), session="one"),
                           moment("s", 0, 1, [0, 0, 0, 0], session="two")])
    assert events_of(events) == [("red", "s", 5, 9, 0)]


def test_idle_streams_are_flushed_and_evicted():
    now = [0.0]
    m = LiveMatcher(BITS, "m1", fake_encoder, settle=3, idle_timeout=60, clock=lambda: now[0])
    m.apply_queries([("red", query("red", "red ", threshold=0))])
    assert m.process([moment("s", 0, 4, list(b"red "))])[0] == []
    now[0] = 100.0
    events, _ = m.process([moment("t", 0, 1, [0, 0, 0, 0])])
    assert events_of(events) == [("red", "s", 0, 4, 0)]
    assert set(m.merger.streams()) <= {"t"}


def test_an_end_marker_ends_the_stream_without_being_a_moment():
    m = matcher(settle=3)
    m.apply_queries([("red", query("red", "red ", threshold=0))])
    final = moment("s", 0, 4, list(b"red "))
    assert m.process([final])[0] == []
    events, _ = m.process([moment("s", 0, 4, list(b"red "), last=True)])
    assert events_of(events) == [("red", "s", 0, 4, 0)]
    assert len(m.search(code=list(b"red "), top_k=10)) == 1  # archived once


def test_restore_replays_the_latest_session_of_a_stream():
    """A stream's new session counts seconds from 0 again: its moments are replayed though an older session of the
    same stream reached later seconds."""
    def moments(session, seconds, planted):
        return [moment("s", x - 1, x, list(b"red ") if x == planted else [0, 0, 0, 0], session=session)
                for x in range(1, seconds + 1)]

    log = moments("old", 200, planted=0) + moments("new", 10, planted=9)
    reference, restarted = matcher(settle=3, longest_moment=1), matcher(settle=3, longest_moment=1)
    for m in (reference, restarted):
        m.apply_queries([("red", query("red", "red ", threshold=0))])
    reference.process(log)
    restarted.restore(("moments", 0), [columns(log[i:i + 7]) for i in range(0, len(log), 7)])
    later = [moment("s", x - 1, x, [0, 0, 0, 0], session="new") for x in range(11, 14)]
    assert events_of(restarted.process(later)[0]) == events_of(reference.process(later)[0]) == [
        ("red", "s", 8, 9, 0)]
