"""The encoder worker's logic: records in log order -> exactly the moments of a full forward pass."""

import numpy as np
import pytest
import torch

from pipeline.bus.records import FrameFeatures
from pipeline.codes.live import HISTORY_INCOMPLETE, OUT_OF_ORDER, LiveCoder
from pipeline.codes.packing import pack_signs
from pipeline.model import StreamingEncoder, build_cmhn, candidate_spans

DIM = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_cmhn("lite", video_dim=DIM).eval()


def _records(stream, features):
    return [FrameFeatures(stream, t, float(t), 1000.0 + t, f) for t, f in enumerate(features)]


def _coder(model):
    return LiveCoder(StreamingEncoder(model), bits=model.config.bits, model="test", clock=lambda: 5.0)


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
    assert restarted.restore("s", window, next_second=50) == []
    second, errors = restarted.encode(records[50:])
    assert errors == []
    assert _by_span(first + second, "s") == _expected(model, records)


def test_restore_with_missing_history_reports_it(model):
    records = _records("s", np.ones((60, DIM)))
    coder = _coder(model)
    errors = coder.restore("s", records[45:50], next_second=50)
    assert [e.kind for e in errors] == [HISTORY_INCOMPLETE]
    assert coder.encoder.next_second("s") == 50


def test_out_of_order_second_is_reported_and_skipped(model):
    records = _records("s", np.ones((10, DIM)))
    coder = _coder(model)
    coder.encode(records[:5])
    moments, errors = coder.encode([records[7], records[5]])
    assert [e.kind for e in errors] == [OUT_OF_ORDER]
    assert {m.end for m in moments} == {6}
    assert coder.encoder.next_second("s") == 6


def test_second_zero_starts_a_new_session(model):
    records = _records("s", np.ones((10, DIM)))
    coder = _coder(model)
    coder.encode(records)
    moments, errors = coder.encode(records[:3])
    assert errors == []
    assert max(m.end for m in moments) == 3
