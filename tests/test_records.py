"""Records on the wire: round trips, exact binary layout, and decoders that fail only with MalformedRecord."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.bus import records as r
from pipeline.bus.records import (
    ErrorRecord, FrameFeatures, InvalidQuery, InvalidRecord, MalformedRecord, MatchEvent, MomentCode, StandingQuery,
    decode, encode, is_tombstone, record_key,
)

keys = st.text(min_size=1, max_size=40).filter(lambda s: r._encodable(s))
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
seconds = st.integers(min_value=0, max_value=10**7)
code_bytes = st.sampled_from([8, 16, 32])


@st.composite
def codes(draw, nbytes=None):
    n = draw(code_bytes) if nbytes is None else nbytes
    return np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8).copy()


@st.composite
def frame_features(draw):
    dim = draw(st.integers(1, 64))
    raw = draw(st.binary(min_size=2 * dim, max_size=2 * dim))  # any float16 bit pattern, NaN included
    gap = draw(st.booleans())
    tags = st.text(max_size=12).filter(r._encodable)
    return FrameFeatures(draw(keys), draw(seconds), draw(times), draw(times), np.frombuffer(raw, np.float16).copy(),
                         gap, draw(times) if gap else 0.0, draw(tags), draw(tags), draw(st.booleans()))


@st.composite
def moment_codes(draw):
    start = draw(seconds)
    code = draw(codes())
    return MomentCode(draw(keys), start, start + draw(st.integers(1, 300)), code, 8 * code.size, draw(times),
                      draw(times), draw(st.text(max_size=20).filter(r._encodable)),
                      draw(st.text(max_size=12).filter(r._encodable)), draw(st.booleans()))


@st.composite
def standing_queries(draw):
    text = draw(st.none() | st.text(min_size=1, max_size=r.MAX_QUERY_CHARS).filter(
        lambda s: s.strip() and r._encodable(s)))
    code = draw(codes()) if text is None else draw(st.none() | codes())
    bits = 0 if code is None else 8 * code.size
    return StandingQuery(draw(keys), text, code, bits, draw(st.integers(0, bits if bits else 64)), draw(times),
                         draw(st.text(max_size=20).filter(r._encodable)))


@st.composite
def match_events(draw):
    start, bits = draw(seconds), 8 * draw(code_bytes)
    return MatchEvent(draw(keys), draw(keys), start, start + draw(st.integers(1, 300)), draw(st.integers(0, bits)),
                      bits, draw(times), draw(times))


scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20).filter(r._encodable)
error_records = st.builds(
    ErrorRecord, keys, st.sampled_from([r.CORRUPT_VIDEO, r.DEAD_SOURCE, r.MALFORMED_RECORD, r.BAD_QUERY, "other"]),
    st.text(max_size=200).filter(r._encodable), times,
    st.dictionaries(st.text(max_size=10).filter(r._encodable), scalars, max_size=4))
any_record = st.one_of(frame_features(), moment_codes(), standing_queries(), match_events(), error_records)


@given(any_record)
def test_every_record_type_round_trips(record):
    data = encode(record)
    back = decode(data, expected=type(record))
    assert back == record and type(back) is type(record)
    assert encode(back) == data


def test_feature_record_layout_is_header_plus_float16_bytes():
    features = np.linspace(-1, 1, 1280, dtype=np.float32)
    record = FrameFeatures("cam-01", 17, 17.0, 1.7e9, features)
    data = encode(record)
    assert len(data) == r.PREFIX.size + len(b"cam-01") + r.FEATURES_FIELDS.size + 2560
    assert data[:3] == r.MAGIC
    assert data[-2560:] == features.astype("<f2").tobytes()
    assert decode(data).features.dtype == np.float16


def test_moment_record_layout_is_header_plus_code_bytes():
    code = np.arange(16, dtype=np.uint8)
    data = encode(MomentCode("cam-01", 3, 10, code, 128, 1.7e9, 1.7e9 + 0.2, "cmhn-lite@3"))
    assert len(data) == r.PREFIX.size + 6 + r.MOMENT_FIELDS.size + len("cmhn-lite@3") + 16  # no session
    assert data[-16:] == code.tobytes()


def test_json_records_are_readable_and_versioned():
    query = StandingQuery("q1", "a person opens the fridge", np.array([1, 255], np.uint8), 16, 3, 5.0, "m")
    obj = json.loads(encode(query))
    assert obj["type"] == "query" and obj["v"] == r.VERSION and obj["code"] == "01ff"
    assert obj["text"] == "a person opens the fridge"
    event = json.loads(encode(MatchEvent("q1", "cam", 4, 9, 3, 128, 10.0, 10.5)))
    assert event["score"] == 122 and event["type"] == "match"


def test_keys_and_tombstones():
    assert record_key(MomentCode("cam-é", 0, 1, np.zeros(8, np.uint8), 64, 0.0, 0.0)) == "cam-é".encode()
    assert record_key(MatchEvent("q9", "cam", 0, 1, 0, 64, 0.0, 0.0)) == b"q9"
    assert record_key(StandingQuery("q9", "x", None, 0, 4, 0.0)) == b"q9"
    assert is_tombstone(None) and not is_tombstone(b"")
    with pytest.raises(MalformedRecord, match="tombstone"):
        decode(None)


def test_expected_type_is_enforced():
    data = encode(MatchEvent("q1", "cam", 0, 1, 0, 64, 0.0, 0.0))
    with pytest.raises(MalformedRecord, match="expected a MomentCode"):
        decode(data, expected=MomentCode)


def test_sessions_extractors_and_last_seconds_travel():
    features = decode(encode(FrameFeatures("cam", 9, 9.0, 1.0, np.ones(4), session="s1", extractor="x-1", last=True)))
    assert (features.session, features.extractor, features.last) == ("s1", "x-1", True)
    moment = decode(encode(MomentCode("cam", 3, 9, np.zeros(8, np.uint8), 64, 1.0, 2.0, "m", "s1", last=True)))
    assert (moment.session, moment.last) == ("s1", True)
    with pytest.raises(InvalidRecord, match="session"):
        FrameFeatures("cam", 0, 0.0, 0.0, np.ones(2), session="s" * (r.MAX_TAG_BYTES + 1))


def test_key_text_names_any_key():
    assert r.key_text("é".encode() * 200, "x") == "é" * (r.MAX_KEY_BYTES // 2)  # cut between characters
    assert r.key_text(b"\xff" * 300, "x").encode().__len__() <= r.MAX_KEY_BYTES
    assert r.key_text(None, "fallback") == "fallback"
    ErrorRecord(r.key_text("漢".encode() * 100, "x"), r.MALFORMED_RECORD, "m", 0.0)  # a valid source


def test_extractor_id_digests_the_whole_identity():
    identity = {"backbone": "mobilenet_v2", "frame_size": 112, "sample_rate": 2.0, "weights_sha256": "ab"}
    assert r.extractor_id(identity).startswith("mobilenet_v2-112px-2.0fps-")
    assert r.extractor_id(identity) == r.extractor_id(dict(reversed(identity.items())))
    assert r.extractor_id(identity) != r.extractor_id({**identity, "pooling": "max"})
    assert len(r.extractor_id(identity).encode()) <= r.MAX_TAG_BYTES


def test_a_reconnect_gap_is_visible():
    record = decode(encode(FrameFeatures("cam", 40, 40.0, 1.0, np.ones(4), gap=True, gap_seconds=12.5)))
    assert record.gap and record.gap_seconds == 12.5
    with pytest.raises(InvalidRecord, match="gap"):
        FrameFeatures("cam", 40, 40.0, 1.0, np.ones(4), gap=False, gap_seconds=3.0)


@pytest.mark.parametrize("text", ["", "   ", "x" * (r.MAX_QUERY_CHARS + 1)])
def test_bad_query_text_is_rejected(text):
    with pytest.raises(InvalidQuery):
        StandingQuery("q1", text, None, 0, 4, 0.0)


def test_query_limits():
    StandingQuery("q1", "x" * r.MAX_QUERY_CHARS, None, 0, 4, 0.0)
    with pytest.raises(InvalidQuery, match="threshold"):
        StandingQuery("q1", None, np.zeros(2, np.uint8), 16, 17, 0.0)
    with pytest.raises(InvalidQuery, match="needs text"):
        StandingQuery("q1", None, None, 0, 4, 0.0)
    with pytest.raises(InvalidQuery, match="bits"):
        StandingQuery("q1", None, np.zeros(2, np.uint8), 8, 4, 0.0)


def test_stream_id_limit():
    FrameFeatures("s" * r.MAX_KEY_BYTES, 0, 0.0, 0.0, np.ones(2))
    with pytest.raises(InvalidRecord, match="more than 256"):
        FrameFeatures("é" * (r.MAX_KEY_BYTES // 2 + 1), 0, 0.0, 0.0, np.ones(2))
    with pytest.raises(InvalidRecord, match="non-empty"):
        MomentCode("", 0, 1, np.zeros(8, np.uint8), 64, 0.0, 0.0)


def test_numpy_scalars_become_python_numbers():
    event = MatchEvent("q", "cam", np.int64(3), np.int32(9), np.int64(20), np.int64(128), np.float32(1.5), 2.0)
    assert type(event.distance) is int and type(event.capture_time) is float
    assert json.loads(encode(event))["distance"] == 20
    with pytest.raises(InvalidRecord, match="bool"):
        FrameFeatures("cam", 0, 0.0, 0.0, np.ones(2), gap="yes")


def test_records_are_immutable():
    features = np.ones(4, np.float16)
    record = FrameFeatures("cam", 0, 0.0, 0.0, features)
    features[0] = 7  # the caller's array is copied
    assert record.features[0] == 1
    with pytest.raises(ValueError):
        record.features[0] = 2
    with pytest.raises(AttributeError):
        record.t = 3


def _valid_encodings() -> list[bytes]:
    return [
        encode(FrameFeatures("cam", 3, 3.0, 1.7e9, np.arange(6, dtype=np.float32), True, 2.0)),
        encode(MomentCode("cam", 3, 9, np.arange(16, dtype=np.uint8), 128, 1.0, 2.0, "m1")),
        encode(StandingQuery("q", "opens the fridge", np.arange(16, dtype=np.uint8), 128, 20, 1.0, "m1")),
        encode(MatchEvent("q", "cam", 3, 9, 20, 128, 1.0, 2.0)),
        encode(ErrorRecord("cam", r.CORRUPT_VIDEO, "bad packet", 1.0, {"topic": "t", "partition": 1, "offset": 9})),
    ]


def _decodes_or_malformed(data: bytes):
    """The record ``data`` decodes to, or None when it is refused as MalformedRecord (any other error fails)."""
    try:
        record = decode(data)
    except MalformedRecord:
        return None
    assert decode(encode(record)) == record  # anything accepted is a valid record
    return record


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: r.MAGIC + b)
       | st.binary(max_size=60).map(lambda b: b"{" + b))
def test_arbitrary_bytes_never_raise_anything_but_malformed(data):
    _decodes_or_malformed(data)


@settings(max_examples=400)
@given(st.sampled_from(_valid_encodings()), st.data())
def test_mutated_and_truncated_encodings(data, draw):
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        buf[draw.draw(st.integers(0, len(buf) - 1))] = draw.draw(st.integers(0, 255))
    _decodes_or_malformed(bytes(buf))
    # a strict prefix is refused; trailing bytes are refused or (JSON whitespace) read as the same record
    assert _decodes_or_malformed(data[:draw.draw(st.integers(0, len(data) - 1))]) is None
    extended = _decodes_or_malformed(data + draw.draw(st.binary(min_size=1, max_size=8)))
    assert extended is None or extended == decode(data)


@pytest.mark.parametrize("data, message", [
    (b"VMH", "truncated"),
    (b"XYZ\x01\x01", "not a VMH record"),
    (r.PREFIX.pack(r.MAGIC, 1, 99, 0, 0), "version 99"),
    (r.PREFIX.pack(r.MAGIC, 7, r.BINARY_VERSION, 0, 0), "unknown binary record type"),
    (r.PREFIX.pack(r.MAGIC, 1, r.BINARY_VERSION, 0, 2) + b"\xff\xfe", "not UTF-8"),
    (r.PREFIX.pack(r.MAGIC, 2, r.BINARY_VERSION, 1, 0), "unknown flags"),
    (b'{"type":"match"', "JSON"),
    (b'{"type":"nope","v":1}', "unknown record type"),
    (b'{"type":"query","v":2}', "version 2"),
    (b'{"type":"match","v":1}', "no field"),
    (b'\xff{}', "not a VMH record"),
    (b'{"type":"query","v":1,"query_id":"q","text":"","code":null,"bits":0,"threshold":1,"created_time":0}',
     "non-empty"),
    (b'{"type":"query","v":1,"query_id":"q","text":null,"code":"zz","bits":8,"threshold":1,"created_time":0}',
     "not hex"),
    (b'{"type":"error","v":1,"source":"s","kind":"k","message":"m","time":"now"}', "wrong type"),
    (b'{"type":"error","v":1,"source":"s","kind":"k","message":"m","time":1e999}', "finite"),
    (b'{"type":"error","v":1,"source":"s","kind":"k","message":"m","time":true}', "wrong type"),
    (b'[1, 2]', "not a VMH record"),
])
def test_specific_malformed_messages(data, message):
    with pytest.raises(MalformedRecord, match=message):
        decode(data)


def test_truncated_features_say_so():
    data = _valid_encodings()[0]
    with pytest.raises(MalformedRecord, match="should be"):
        decode(data[:-1])


def test_error_context_must_be_json_scalars():
    record = ErrorRecord("cam", r.MALFORMED_RECORD, "bad", 1.0, {"topic": "vmh.moments", "partition": 2, "offset": 7})
    assert decode(encode(record)).context["offset"] == 7
    for context in ({"x": float("nan")}, {"x": [1]}, {1: "x"}):
        with pytest.raises(InvalidRecord, match="context"):
            ErrorRecord("cam", r.MALFORMED_RECORD, "bad", 1.0, context)


def test_tampered_match_score_is_rejected():
    obj = json.loads(encode(MatchEvent("q", "cam", 3, 9, 20, 128, 1.0, 2.0)))
    obj["score"] = 0
    with pytest.raises(MalformedRecord, match="score"):
        decode(json.dumps(obj).encode())


def test_encoding_thousands_of_feature_records_is_fast():
    batch = [FrameFeatures("cam", t, float(t), 1.7e9 + t, np.full(1280, t, np.float16)) for t in range(5000)]
    start = time.perf_counter()
    encoded = [encode(record) for record in batch]
    decoded = [decode(data) for data in encoded]
    assert time.perf_counter() - start < 2.0  # per-record cost is a few struct calls, not per-element work
    assert decoded[4321] == batch[4321]


def test_decode_moments_reads_exactly_what_decode_reads():
    """The columns hold the records ``decode`` reads as 128-bit moments, in order, field for field; every mutation
    ``decode`` refuses (or reads as another code length) is left out."""
    import struct as _struct

    from pipeline.bus.records import MOMENT_FIELDS, PREFIX, decode_moments

    rng = np.random.default_rng(3)
    good = [encode(MomentCode(f"cam-{i % 3}", i, i + 1 + i % 5, rng.integers(0, 256, 16, dtype=np.uint8), 128,
                              1e9 + i, 2e9, model="m" * (i % 2), session=f"s{i % 4}", last=i % 7 == 0))
            for i in range(60)]
    fields = PREFIX.size + 5  # where the fields of a "cam-N" record start

    def patched(value: bytes, at: int, data: bytes) -> bytes:
        return value[:at] + data + value[at + len(data):]

    values = good + [
        good[0][:-1], good[1] + b"\0", b"", b"VMH", b'{"type": "match"}', patched(good[2], 3, b"\x01"),
        patched(good[3], 4, b"\x01"), patched(good[4], 5, b"\x04"), patched(good[5], 6, b"\0\0"),
        patched(good[6], PREFIX.size, b"\xff"), patched(good[7], fields, _struct.pack("<q", -1)),
        patched(good[8], fields + 8, _struct.pack("<q", 8)), patched(good[9], fields + 16, _struct.pack("<d", np.nan)),
        patched(good[10], fields + 24, _struct.pack("<d", np.inf)), patched(good[11], fields + 32, b"\x40\0"),
        encode(MomentCode("short", 0, 1, np.zeros(8, np.uint8), 64, 0.0, 0.0)),
        patched(good[12], fields + MOMENT_FIELDS.size + 1, b"\xc3"),  # the model id "m" becomes bad UTF-8
    ]
    order = rng.permutation(len(values))
    values = [values[i] for i in order]
    expected = []
    for value in values:
        try:
            moment = decode(value, MomentCode)
        except MalformedRecord:
            continue
        if moment.bits == 128:
            expected.append(moment)
    columns = decode_moments(values, 128)
    assert len(columns) == len(expected) == 60  # every mutation is refused
    for row, moment in enumerate(expected):
        assert columns.moment(row) == moment
        assert (columns.stream_ids[columns.streams[row]], columns.session_ids[columns.sessions[row]],
                columns.model_ids[columns.models[row]], int(columns.starts[row]), int(columns.ends[row]),
                float(columns.capture_times[row])) == (moment.stream_id, moment.session, moment.model, moment.start,
                                                       moment.end, moment.capture_time)
        np.testing.assert_array_equal(columns.codes[row], moment.code)
