"""The encoder worker's logic: records in log order -> exactly the moments of a full forward pass."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.bus.records import FrameFeatures
from pipeline.codes.live import BAD_FEATURES, FOREIGN_EXTRACTOR, HISTORY_INCOMPLETE, OUT_OF_ORDER, LiveCoder
from pipeline.partitions import Origin
from pipeline.codes.packing import pack_signs
from pipeline.model import StreamingEncoder, build_cmhn, candidate_spans

DIM = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_cmhn("lite", video_dim=DIM).eval()


def _records(stream, features):
    return [FrameFeatures(stream, t, float(t), 1000.0 + t, f) for t, f in enumerate(features)]


def _coder(model, **kw):
    return LiveCoder(StreamingEncoder(model), bits=model.config.bits, model="test", **{"clock": lambda: 5.0, **kw})


def _expected(model, records):
    """Codes of the full causal forward pass over the float16 features the records carry."""
    features = torch.from_numpy(np.stack([r.features for r in records]).astype(np.float32))
    with torch.no_grad():
        values = model.ven(features)
    spans = candidate_spans(len(records), model.config.kernel_sizes, model.config.strides)
    codes = pack_signs(values)
    return {(int(s), int(e)): codes[i].tobytes() for i, (s, e) in enumerate(spans)}


def _by_span(moments, stream):
    return {(m.start, m.end): m.code.tobytes() for m in moments if m.stream_id == stream}


def test_interleaved_streams_equal_full_forward(model):
    rng = np.random.default_rng(1)
    a = _records("a", rng.normal(size=(40, DIM)))
    b = _records("b", rng.normal(size=(25, DIM)))
    log = []
    for i in range(40):  # interleaved as on a partition, in uneven batches
        log.append(a[i])
        if i < 25:
            log.append(b[i])
    coder = _coder(model)
    moments = []
    for chunk in (log[:7], log[7:30], log[30:]):
        out, errors = coder.encode(chunk)
        assert errors == []
        moments += out
    assert _by_span(moments, "a") == _expected(model, a)
    assert _by_span(moments, "b") == _expected(model, b)
    assert len(moments) == len(_expected(model, a)) + len(_expected(model, b))  # none doubled
    assert all(m.capture_time == 1000.0 + m.end - 1 and m.model == "test" for m in moments)


def test_restore_from_history_continues_exactly(model):
    rng = np.random.default_rng(2)
    records = _records("s", rng.normal(size=(80, DIM)))
    coder = _coder(model)
    first, _ = coder.encode(records[:50])
    restarted = _coder(model)
    assert restarted.needs_history(records[50])
    window = records[50 - restarted.history_seconds : 50]
    assert restarted.restore(records[50], window) == []
    second, errors = restarted.encode(records[50:])
    assert errors == []
    assert _by_span(first + second, "s") == _expected(model, records)


def test_restore_with_missing_history_reports_it(model):
    records = _records("s", np.ones((60, DIM)))
    coder = _coder(model)
    errors = coder.restore(records[50], records[45:50])
    assert [e.kind for e in errors] == [HISTORY_INCOMPLETE]
    assert coder.next_second("s") == 50


def test_out_of_order_second_is_reported_and_skipped(model):
    records = _records("s", np.ones((10, DIM)))
    coder = _coder(model)
    coder.encode(records[:5])
    moments, errors = coder.encode([records[7], records[5]])
    assert [e.kind for e in errors] == [HISTORY_INCOMPLETE, OUT_OF_ORDER]  # 5 and 6 bridged, then 5 repeats
    assert {m.end for m in moments} == {8}
    assert coder.next_second("s") == 8


def test_second_zero_of_a_new_session_starts_over(model):
    records = _records("s", np.ones((10, DIM)))
    coder = _coder(model)
    coder.encode(records)
    again, errors = coder.encode(records[:3])
    assert [e.kind for e in errors] == [OUT_OF_ORDER] * 3  # the same session going back: skipped
    assert again == []
    moments, errors = coder.encode([replace(r, session="later") for r in records[:3]])
    assert errors == []
    assert max(m.end for m in moments) == 3 and {m.session for m in moments} == {"later"}


def test_unusable_features_are_error_records_and_the_streams_go_on(model):
    rng = np.random.default_rng(3)
    good = [replace(r, extractor="x1") for r in _records("good", rng.normal(size=(6, DIM)))]
    other = [replace(r, extractor="x1") for r in _records("other", rng.normal(size=(6, DIM)))]
    nan = np.ones(DIM)
    nan[3] = np.nan
    bad = [replace(other[2], features=np.ones(DIM + 3)), replace(other[3], extractor="resnet18-512"),
           replace(other[4], features=nan)]
    log = good[:3] + other[:2] + bad + good[3:]
    origins = [Origin("f", 0, i) for i in range(len(log))]
    coder = _coder(model, extractor="x1")
    moments, errors = coder.encode(log, origins)
    assert [(e.kind, e.context["offset"], e.context["t"]) for e in errors] == [
        (BAD_FEATURES, 5, 2), (FOREIGN_EXTRACTOR, 6, 3), (BAD_FEATURES, 7, 4)]
    assert "NaN" in errors[2].message and "resnet18-512" in errors[1].message and "f[0]@5" in errors[0].message
    assert _by_span(moments, "good") == _expected(model, good)


def test_a_gap_is_bridged_with_zeros_and_the_stream_resumes(model):
    rng = np.random.default_rng(4)
    records = _records("s", rng.normal(size=(40, DIM)))
    coder = _coder(model)
    moments, errors = coder.encode(records[:10] + records[15:])
    assert [e.kind for e in errors] == [HISTORY_INCOMPLETE] and "10 to 14" in errors[0].message
    bridged = records[:10] + [replace(r, features=np.zeros(DIM)) for r in records[10:15]] + records[15:]
    expected = {span: code for span, code in _expected(model, bridged).items() if not 10 < span[1] <= 15}
    assert _by_span(moments, "s") == expected


def test_seconds_the_producer_shed_keep_their_numbers_and_are_not_reported(model):
    rng = np.random.default_rng(6)
    records = _records("s", rng.normal(size=(30, DIM)))
    announced = replace(records[15], gap=True, gap_seconds=5.0)  # seconds 10 to 14 shed before it
    received = records[:10] + [announced] + records[16:]
    moments, errors = _coder(model).encode(received)
    assert errors == [] and {m.end for m in moments} == set(range(1, 11)) | set(range(16, 31))
    bridged = records[:10] + [replace(r, features=np.zeros(DIM)) for r in records[10:15]] + received[10:]
    assert _by_span(moments, "s") == {span: code for span, code in _expected(model, bridged).items()
                                      if not 10 < span[1] <= 15}


def test_a_gap_longer_than_the_window_is_bridged_too(model):
    records = _records("s", np.ones((10, DIM)))
    coder = _coder(model)
    coder.encode(records[:5])
    late = replace(records[9], t=5 + 10 * coder.history_seconds)
    moments, errors = coder.encode([late])
    assert [e.kind for e in errors] == [HISTORY_INCOMPLETE]
    assert {m.end for m in moments} == {late.t + 1}


def test_history_is_asked_for_when_a_session_is_not_held(model):
    rng = np.random.default_rng(5)
    records = _records("s", rng.normal(size=(60, DIM)))
    first, _ = _coder(model).encode(records[:40])
    asked = []
    restarted = _coder(model)
    second, errors = restarted.encode(records[40:], history=lambda r, origin: asked.append(r.t) or records[:40])
    assert errors == [] and asked == [40]
    assert _by_span(first + second, "s") == _expected(model, records)


def test_the_last_second_marks_the_final_moment_and_frees_the_stream(model):
    records = _records("s", np.ones((8, DIM)))
    records[-1] = replace(records[-1], last=True)
    coder = _coder(model)
    moments, _ = coder.encode(records)
    assert [m.last for m in moments].count(True) == 1 and moments[-1].last and moments[-1].end == 8
    assert len(coder) == 0


def test_idle_streams_are_evicted_and_partitions_forgotten(model):
    now = [0.0]
    coder = _coder(model, idle_timeout=60, clock=lambda: now[0])
    a, b = _records("a", np.ones((3, DIM))), _records("b", np.ones((3, DIM)))
    coder.encode(a[:1] + b[:1], [Origin("f", 0, 0), Origin("f", 1, 0)])
    coder.forget([("f", 1)])
    assert len(coder) == 1 and coder.next_second("b") == 0
    now[0] = 61.0
    coder.encode(b[:1])
    assert len(coder) == 1 and coder.next_second("a") == 0  # a was idle for 61 s


def test_the_end_marker_repeats_the_final_moment_marked(model):
    records = _records("s", np.ones((6, DIM)))
    coder = _coder(model)
    moments, _ = coder.encode(records)
    marker, errors = coder.encode([replace(records[-1], last=True)])
    assert errors == [] and len(marker) == 1 and marker[0].last
    assert (marker[0].start, marker[0].end, marker[0].code.tobytes()) == (
        moments[-1].start, moments[-1].end, moments[-1].code.tobytes())
    assert len(coder) == 0
    restarted = _coder(model)  # a coder that never held the stream takes the marker as the end, not a new second
    assert restarted.encode([replace(records[-1], last=True)], history=lambda r, o: records) == ([], [])


def test_a_restart_after_a_shed_hole_restores_the_state_of_an_uninterrupted_run(model):
    rng = np.random.default_rng(7)
    records = _records("s", rng.normal(size=(40, DIM)))
    received = records[:20] + [replace(records[24], gap=True, gap_seconds=4.0)] + records[25:]  # 20 to 23 shed
    whole, _ = _coder(model).encode(received)
    first, _ = _coder(model).encode(received[:25])
    restarted = _coder(model)
    assert restarted.history_seconds > received[25].t - 20, "the window must reach back across the hole"
    second, errors = restarted.encode(received[25:], history=lambda r, origin: received[:25])
    assert errors == []
    assert _by_span(first + second, "s") == _by_span(whole, "s")


def test_a_record_claiming_an_endless_hole_costs_nothing_to_restore(model):
    """A well-formed record may claim any gap; restoring across it counts only the window's seconds."""
    records = _records("s", np.ones((40, DIM)))
    claims = replace(records[35], gap=True, gap_seconds=1e300)
    restarted = _coder(model)
    moments, errors = restarted.encode([replace(records[36], t=36)], history=lambda r, o: records[:30] + [claims])
    assert errors == [] and {m.end for m in moments} == {37}
