"""The records on the wire: what each topic carries and how it is encoded.

Features and moment codes are the high-volume records, so they use a compact binary layout: a fixed little-endian
header (magic ``b"VMH"``, record type, format version, flags, stream id length), the stream id in UTF-8, the
record's fixed fields, then the raw array bytes (float16 features or packed uint8 codes). A 1280-d feature record
is about 2.6 kB, and encoding is a ``struct.pack`` plus one ``tobytes``. Keyframes use the same layout with the
JPEG's bytes as the payload. Standing queries, match events and errors
are JSON (UTF-8, with ``"type"`` and ``"v"`` fields) so that any Kafka client or a human can read them.

``decode`` raises ``MalformedRecord`` and nothing else for bytes that are not a valid record, so a worker can
route any bad record to the errors topic without knowing what went wrong inside the decoder. Constructing a
record with invalid fields raises ``InvalidRecord`` (``InvalidQuery`` for a bad standing query).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

VERSION = 1  # of the JSON records
BINARY_VERSION = 2  # of the features and moment records: 2 added the session, extractor and last-second fields
MAGIC = b"VMH"
MAX_KEY_BYTES = 256  # stream ids and query ids, in UTF-8
MAX_MODEL_BYTES = 256
MAX_TAG_BYTES = 64  # session and extractor ids, in UTF-8
MAX_QUERY_CHARS = 1000
MAX_CODE_BITS = 4096

# magic, record type, version, flags, stream id length; then the stream id
PREFIX = struct.Struct("<3sBBBH")
# second index t, media time, capture time, gap seconds, feature dimension, session and extractor id lengths;
# then the session id, the extractor id, float16 [V]
FEATURES_FIELDS = struct.Struct("<qdddIBB")
# start, end, capture time, emitted time, bits, model id and session id lengths; then the model id, the session id,
# uint8 [bits / 8]
MOMENT_FIELDS = struct.Struct("<qqddHHB")
# second index t, media time, capture time, session id length; then the session id, the JPEG bytes
KEYFRAME_FIELDS = struct.Struct("<qddB")
JPEG_START = b"\xff\xd8\xff"  # the SOI marker and the first segment's marker

_FEATURES_TYPE, _MOMENT_TYPE, _KEYFRAME_TYPE = 1, 2, 3
_GAP_FLAG, _LAST_FLAG = 1, 2  # features: both; moments: only _LAST_FLAG
_FLOAT16 = np.dtype("<f2")

# error kinds the pipeline itself reports; workers may report others
CORRUPT_VIDEO = "corrupt_video"
DEAD_SOURCE = "dead_source"
MALFORMED_RECORD = "malformed_record"
BAD_QUERY = "bad_query"


class InvalidRecord(ValueError):
    """A record cannot be built from these fields."""


class InvalidQuery(InvalidRecord):
    """A standing query is unusable: empty or too long text, or a bad code or threshold."""


class MalformedRecord(ValueError):
    """Bytes that do not decode to a valid record."""


class _Record:
    """Equality by value, with arrays compared by dtype, shape and bytes."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    return a == b


@dataclass(frozen=True, eq=False)
class FrameFeatures(_Record):
    """One second of one stream: the pooled frame-CNN feature vector of media second ``t``.

    ``gap`` marks the first second after a hole (a reconnect, or seconds shed under load), and ``gap_seconds`` how
    much media time was lost before it; the whole seconds lost keep their numbers, so ``t`` jumps over them.
    ``session`` names the producer session that numbers the seconds (t restarts at 0 in a new one), ``extractor``
    the frame path that made the vector (``extractor_id``), and ``last`` marks the stream's final second.
    """

    KIND: ClassVar[str] = "features"
    stream_id: str
    t: int
    media_time: float
    capture_time: float
    features: np.ndarray
    gap: bool = False
    gap_seconds: float = 0.0
    session: str = ""
    extractor: str = ""
    last: bool = False

    def __post_init__(self) -> None:
        _check_key("stream_id", self.stream_id)
        _check_int(self, "t", low=0)
        _check_times(self, "media_time", "capture_time", "gap_seconds")
        _check_text("session", self.session, MAX_TAG_BYTES)
        _check_text("extractor", self.extractor, MAX_TAG_BYTES)
        _check_bools(self, "gap", "last")
        if self.gap_seconds < 0 or (self.gap_seconds > 0 and not self.gap):
            raise InvalidRecord(f"gap_seconds {self.gap_seconds} needs gap=True and must be >= 0")
        array = np.asarray(self.features)
        if array.ndim != 1 or array.size == 0 or not (np.issubdtype(array.dtype, np.floating)
                                                     or np.issubdtype(array.dtype, np.integer)):
            raise InvalidRecord(f"features must be a non-empty 1-d numeric vector, got {array.dtype} {array.shape}")
        _freeze(self, "features", array.astype(np.float16, copy=False))

    @property
    def announced_from(self) -> int:
        """The first second of the hole announced just before this one (``t`` itself when none): the whole seconds
        of ``gap_seconds``, which kept their numbers."""
        return self.t - int(self.gap_seconds)


@dataclass(frozen=True, eq=False)
class MomentCode(_Record):
    """A candidate moment [start, end) seconds of a stream with its packed B-bit hash code.

    ``capture_time`` is the wall-clock capture time of the moment's last second, so consumers can measure the
    end-to-end latency; ``model`` names the model (and version) whose code space the code lives in. ``session`` is
    the producer session of the stream's seconds; ``last`` marks the final moment of a stream that ended.
    """

    KIND: ClassVar[str] = "moment"
    stream_id: str
    start: int
    end: int
    code: np.ndarray
    bits: int
    capture_time: float
    emitted_time: float
    model: str = ""
    session: str = ""
    last: bool = False

    def __post_init__(self) -> None:
        _check_key("stream_id", self.stream_id)
        _check_int(self, "start", low=0)
        _check_int(self, "end", low=self.start + 1)
        _check_times(self, "capture_time", "emitted_time")
        _check_text("model", self.model, MAX_MODEL_BYTES)
        _check_text("session", self.session, MAX_TAG_BYTES)
        _check_bools(self, "last")
        _check_code(self, InvalidRecord)


@dataclass(frozen=True, eq=False)
class Keyframe(_Record):
    """The JPEG of one stream second (its frame nearest the middle of the second), numbered like that second's
    features record (``t`` of producer session ``session``), so a moment [start, end) is shown by the keyframes of
    its seconds."""

    KIND: ClassVar[str] = "keyframe"
    stream_id: str
    t: int
    media_time: float
    capture_time: float
    jpeg: bytes
    session: str = ""

    def __post_init__(self) -> None:
        _check_key("stream_id", self.stream_id)
        _check_int(self, "t", low=0)
        _check_times(self, "media_time", "capture_time")
        _check_text("session", self.session, MAX_TAG_BYTES)
        if not isinstance(self.jpeg, bytes) or not self.jpeg.startswith(JPEG_START):
            raise InvalidRecord(f"jpeg must be the bytes of a JPEG image, got {bytes(self.jpeg[:8])!r}")


@dataclass(frozen=True, eq=False)
class StandingQuery(_Record):
    """A registered query: match every new moment within ``threshold`` bits (Hamming distance) of ``code``.

    ``code`` may be None for a query given only as ``text``, for the query worker to encode; ``bits`` is then 0.
    ``threshold`` None means the serving model's own, calibrated with it (its checkpoint's ``threshold``).
    """

    KIND: ClassVar[str] = "query"
    query_id: str
    text: str | None
    code: np.ndarray | None
    bits: int
    threshold: int | None
    created_time: float
    model: str = ""

    def __post_init__(self) -> None:
        try:
            _check_key("query_id", self.query_id)
            if self.threshold is not None:
                _check_int(self, "threshold", low=0)
            _check_times(self, "created_time")
            _check_text("model", self.model, MAX_MODEL_BYTES)
        except InvalidRecord as error:
            raise InvalidQuery(str(error)) from None
        if self.text is not None:
            if not isinstance(self.text, str) or not self.text.strip():
                raise InvalidQuery(f"query {self.query_id!r}: text must be a non-empty string, got {self.text!r}")
            if not _encodable(self.text):
                raise InvalidQuery(f"query {self.query_id!r}: text cannot be encoded as UTF-8")
            if len(self.text) > MAX_QUERY_CHARS:
                raise InvalidQuery(f"query {self.query_id!r}: text has {len(self.text)} characters, "
                                   f"more than {MAX_QUERY_CHARS}")
        if self.code is None:
            if self.text is None or self.bits != 0:
                raise InvalidQuery(f"query {self.query_id!r}: without a code it needs text and bits=0")
            object.__setattr__(self, "bits", 0)
            return
        _check_code(self, InvalidQuery)
        if self.threshold is not None and self.threshold > self.bits:
            raise InvalidQuery(f"query {self.query_id!r}: threshold {self.threshold} exceeds {self.bits} bits")


@dataclass(frozen=True, eq=False)
class MatchEvent(_Record):
    """A moment of a stream whose code is within a standing query's threshold."""

    KIND: ClassVar[str] = "match"
    query_id: str
    stream_id: str
    start: int
    end: int
    distance: int
    bits: int
    capture_time: float
    match_time: float

    def __post_init__(self) -> None:
        _check_key("query_id", self.query_id)
        _check_key("stream_id", self.stream_id)
        _check_int(self, "start", low=0)
        _check_int(self, "end", low=self.start + 1)
        _check_int(self, "bits", low=8, high=MAX_CODE_BITS)
        _check_int(self, "distance", low=0, high=self.bits)
        _check_times(self, "capture_time", "match_time")

    @property
    def score(self) -> int:
        """The +-1 inner product of the two codes, B - 2d: what the model ranks by."""
        return self.bits - 2 * self.distance

    @property
    def latency(self) -> float:
        """Seconds from the capture of the moment's last second to the match."""
        return self.match_time - self.capture_time


@dataclass(frozen=True, eq=False)
class ErrorRecord(_Record):
    """Something a worker could not process, e.g. kind ``corrupt_video`` from a producer or ``malformed_record``
    with ``context`` holding the topic, partition and offset of the bad record."""

    KIND: ClassVar[str] = "error"
    source: str
    kind: str
    message: str
    time: float
    context: dict[str, str | int | float | bool | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_key("source", self.source)
        _check_text("kind", self.kind, MAX_KEY_BYTES, empty=False)
        _check_text("message", self.message, None)
        _check_times(self, "time")
        if not isinstance(self.context, dict) or not all(
                isinstance(k, str) and _encodable(k) and (v is None or isinstance(v, (int, bool))
                                                          or (isinstance(v, str) and _encodable(v))
                                                          or (isinstance(v, float) and math.isfinite(v)))
                for k, v in self.context.items()):
            raise InvalidRecord(f"context must map strings to strings, numbers or None, got {self.context!r}")


Record = FrameFeatures | MomentCode | Keyframe | StandingQuery | MatchEvent | ErrorRecord
_JSON_TYPES: dict[str, type] = {cls.KIND: cls for cls in (StandingQuery, MatchEvent, ErrorRecord)}


def encode(record: Record) -> bytes:
    """The bytes of a record: binary for features and moments, UTF-8 JSON for the rest."""
    if isinstance(record, FrameFeatures):
        sid, session, extractor = record.stream_id.encode(), record.session.encode(), record.extractor.encode()
        flags = (_GAP_FLAG if record.gap else 0) | (_LAST_FLAG if record.last else 0)
        head = PREFIX.pack(MAGIC, _FEATURES_TYPE, BINARY_VERSION, flags, len(sid))
        fields = FEATURES_FIELDS.pack(record.t, record.media_time, record.capture_time, record.gap_seconds,
                                      record.features.size, len(session), len(extractor))
        return b"".join((head, sid, fields, session, extractor, record.features.astype(_FLOAT16, copy=False).tobytes()))
    if isinstance(record, MomentCode):
        sid, model, session = record.stream_id.encode(), record.model.encode(), record.session.encode()
        head = PREFIX.pack(MAGIC, _MOMENT_TYPE, BINARY_VERSION, _LAST_FLAG if record.last else 0, len(sid))
        fields = MOMENT_FIELDS.pack(record.start, record.end, record.capture_time, record.emitted_time, record.bits,
                                    len(model), len(session))
        return b"".join((head, sid, fields, model, session, record.code.tobytes()))
    if isinstance(record, Keyframe):
        sid, session = record.stream_id.encode(), record.session.encode()
        head = PREFIX.pack(MAGIC, _KEYFRAME_TYPE, BINARY_VERSION, 0, len(sid))
        fields = KEYFRAME_FIELDS.pack(record.t, record.media_time, record.capture_time, len(session))
        return b"".join((head, sid, fields, session, record.jpeg))
    if isinstance(record, (StandingQuery, MatchEvent, ErrorRecord)):
        obj: dict[str, Any] = {"type": record.KIND, "v": VERSION}
        obj.update((f.name, getattr(record, f.name)) for f in dataclasses.fields(record))
        if isinstance(record, StandingQuery):
            obj["code"] = None if record.code is None else record.code.tobytes().hex()
        if isinstance(record, MatchEvent):
            obj["score"] = record.score
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    raise TypeError(f"not a record: {type(record).__name__}")


def decode(data: bytes | None, expected: type | None = None) -> Record:
    """The record in ``data``; ``expected`` (a record class) also requires that type. Raises ``MalformedRecord``."""
    if data is None:
        raise MalformedRecord("a tombstone (None value) is not a record; check is_tombstone first")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedRecord(f"record value must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        if data[:3] == MAGIC:
            record = _decode_binary(data)
        elif data.lstrip()[:1] == b"{":
            record = _decode_json(data)
        else:
            raise MalformedRecord(f"not a VMH record: starts with {data[:8]!r}")
    except InvalidRecord as error:
        raise MalformedRecord(f"invalid record: {error}") from None
    if expected is not None and not isinstance(record, expected):
        raise MalformedRecord(f"expected a {expected.__name__}, got a {type(record).__name__}")
    return record


def is_tombstone(value: bytes | None) -> bool:
    """A Kafka record with a None value: on the queries topic, the deletion of the query of its key."""
    return value is None


def record_key(record: Record) -> bytes:
    """The Kafka key: the stream id for per-stream records, the query id for queries and matches, else the source."""
    if isinstance(record, (FrameFeatures, MomentCode, Keyframe)):
        return record.stream_id.encode()
    if isinstance(record, (StandingQuery, MatchEvent)):
        return record.query_id.encode()
    if isinstance(record, ErrorRecord):
        return record.source.encode()
    raise TypeError(f"not a record: {type(record).__name__}")


def _decode_binary(data: bytes) -> Record:
    magic, rtype, version, flags, sid_len = _unpack(PREFIX, data, 0, "header")
    if version != BINARY_VERSION:
        raise MalformedRecord(f"binary record version {version} is not supported (this is version {BINARY_VERSION})")
    offset = PREFIX.size
    stream_id = _text(data[offset:offset + sid_len], sid_len, "stream id")
    offset += sid_len
    if rtype == _FEATURES_TYPE:
        if flags & ~(_GAP_FLAG | _LAST_FLAG):
            raise MalformedRecord(f"unknown flags {flags:#x} in a features record")
        t, media_time, capture_time, gap_seconds, dim, session_len, extractor_len = _unpack(
            FEATURES_FIELDS, data, offset, "features fields")
        offset += FEATURES_FIELDS.size
        session = _text(data[offset:offset + session_len], session_len, "session id")
        offset += session_len
        extractor = _text(data[offset:offset + extractor_len], extractor_len, "extractor id")
        offset += extractor_len
        _expect_length(data, offset + 2 * dim, "features")
        features = np.frombuffer(data, dtype=_FLOAT16, count=dim, offset=offset)
        return FrameFeatures(stream_id, t, media_time, capture_time, features, bool(flags & _GAP_FLAG), gap_seconds,
                             session, extractor, bool(flags & _LAST_FLAG))
    if rtype == _MOMENT_TYPE:
        if flags & ~_LAST_FLAG:
            raise MalformedRecord(f"unknown flags {flags:#x} in a moment record")
        start, end, capture_time, emitted_time, bits, model_len, session_len = _unpack(
            MOMENT_FIELDS, data, offset, "moment fields")
        offset += MOMENT_FIELDS.size
        model = _text(data[offset:offset + model_len], model_len, "model id")
        offset += model_len
        session = _text(data[offset:offset + session_len], session_len, "session id")
        offset += session_len
        if bits % 8:
            raise MalformedRecord(f"moment code of {bits} bits is not whole bytes")
        _expect_length(data, offset + bits // 8, "moment")
        code = np.frombuffer(data, dtype=np.uint8, count=bits // 8, offset=offset)
        return MomentCode(stream_id, start, end, code, bits, capture_time, emitted_time, model, session,
                          bool(flags & _LAST_FLAG))
    if rtype == _KEYFRAME_TYPE:
        if flags:
            raise MalformedRecord(f"unknown flags {flags:#x} in a keyframe record")
        t, media_time, capture_time, session_len = _unpack(KEYFRAME_FIELDS, data, offset, "keyframe fields")
        offset += KEYFRAME_FIELDS.size
        session = _text(data[offset:offset + session_len], session_len, "session id")
        return Keyframe(stream_id, t, media_time, capture_time, data[offset + session_len:], session)
    raise MalformedRecord(f"unknown binary record type {rtype}")


def _decode_json(data: bytes) -> Record:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MalformedRecord(f"not valid UTF-8 JSON: {error}") from None
    if not isinstance(obj, dict):
        raise MalformedRecord(f"a JSON record must be an object, got {type(obj).__name__}")
    cls = _JSON_TYPES.get(obj.get("type")) if isinstance(obj.get("type"), str) else None
    if cls is None:
        raise MalformedRecord(f"unknown record type {obj.get('type')!r}; known: {', '.join(_JSON_TYPES)}")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise MalformedRecord(f"{cls.KIND} record version {obj.get('v')!r} is not supported (this is version {VERSION})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedRecord(f"{cls.KIND} record has no field {f.name!r}")
            continue
        kwargs[f.name] = _typed(cls, f.name, obj[f.name], f.type)
    if cls is StandingQuery and kwargs["code"] is not None:
        try:
            kwargs["code"] = np.frombuffer(bytes.fromhex(kwargs["code"]), dtype=np.uint8)
        except ValueError:
            raise MalformedRecord(f"query code {kwargs['code'][:40]!r} is not hex") from None
    record = cls(**kwargs)
    if cls is MatchEvent and obj.get("score") != record.score:
        raise MalformedRecord(f"match score {obj.get('score')!r} is not bits - 2 * distance = {record.score}")
    return record


# JSON field types by annotation (the module uses postponed annotations, so these are strings)
_JSON_CHECKS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "int | None": (int, type(None)), "float": (int, float),
    "str | None": (str, type(None)),
    "np.ndarray | None": (str, type(None)), "dict[str, str | int | float | bool | None]": (dict,),
}


def _typed(cls: type, name: str, value: Any, annotation: str) -> Any:
    allowed = _JSON_CHECKS[annotation]
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise MalformedRecord(f"{cls.KIND} field {name!r} has the wrong type: {type(value).__name__}")
    if annotation != "float":
        return value
    try:
        return float(value)
    except OverflowError:
        raise MalformedRecord(f"{cls.KIND} field {name!r} is out of range: {value}") from None


def _unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple:
    if len(data) < offset + layout.size:
        raise MalformedRecord(f"truncated record: {len(data)} bytes end inside the {what}")
    return layout.unpack_from(data, offset)


def _expect_length(data: bytes, length: int, what: str) -> None:
    if len(data) != length:
        raise MalformedRecord(f"{what} record should be {length} bytes, got {len(data)}")


def _text(raw: bytes, length: int, what: str) -> str:
    if len(raw) != length:
        raise MalformedRecord(f"truncated record: the {what} needs {length} bytes, {len(raw)} left")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRecord(f"the {what} is not UTF-8: {raw[:40]!r}") from None


def key_text(raw: bytes | None, fallback: str) -> str:
    """A Kafka key as a record's source or id: UTF-8 (undecodable bytes replaced), cut to ``MAX_KEY_BYTES`` at a
    character boundary, ``fallback`` when empty; so any key, however long or broken, can name an error record."""
    text = raw.decode("utf-8", "replace") if raw else ""
    text = text.encode()[:MAX_KEY_BYTES].decode("utf-8", "ignore")
    return text or fallback


def extractor_id(identity: dict[str, Any]) -> str:
    """The id feature records carry for a frame extractor: readable backbone, frame size and rate, then a digest of
    the whole identity (weights digest and any other field), so two extractors share an id only if identical."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    head = f"{identity.get('backbone', '?')}"[:24]
    return f"{head}-{identity.get('frame_size', '?')}px-{identity.get('sample_rate', '?')}fps-{digest}"


def _check_key(name: str, value: Any) -> None:
    _check_text(name, value, MAX_KEY_BYTES, empty=False)


def _check_text(name: str, value: Any, max_bytes: int | None, empty: bool = True) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidRecord(f"{name} must be a {'' if empty else 'non-empty '}string, got {value!r}")
    if not _encodable(value):
        raise InvalidRecord(f"{name} {value!r} cannot be encoded as UTF-8")
    if max_bytes is not None and len(value.encode()) > max_bytes:
        raise InvalidRecord(f"{name} is {len(value.encode())} bytes in UTF-8, more than {max_bytes}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _check_int(record: Any, name: str, low: int, high: int = 2**63 - 1) -> None:
    """Check an integer field and store it as a Python int (numpy integers do not serialise to JSON)."""
    value = getattr(record, name)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRecord(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    object.__setattr__(record, name, int(value))


def _check_bools(record: Any, *names: str) -> None:
    for name in names:
        value = getattr(record, name)
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidRecord(f"{name} must be a bool, got {value!r}")
        object.__setattr__(record, name, bool(value))


def _check_times(record: Any, *names: str) -> None:
    """Check finite number fields and store them as Python floats."""
    for name in names:
        value = getattr(record, name)
        if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise InvalidRecord(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(record, name, float(value))


def _check_code(record: Any, error: type[InvalidRecord]) -> None:
    """Check ``code`` (packed uint8) against ``bits`` and freeze it."""
    try:
        _check_int(record, "bits", low=8, high=MAX_CODE_BITS)
    except InvalidRecord as bad:
        raise error(str(bad)) from None
    array = np.asarray(record.code)
    if array.dtype != np.uint8 or array.ndim != 1 or record.bits != 8 * array.size:
        raise error(f"code does not match bits={record.bits}: expected uint8 [{record.bits // 8}], "
                    f"got {array.dtype} {list(array.shape)}")
    _freeze(record, "code", array)


def _freeze(record: Any, name: str, array: np.ndarray) -> None:
    # records are immutable: keep read-only arrays (e.g. views of the decoded bytes), copy writeable ones
    if array.flags.writeable:
        array = array.copy()
        array.flags.writeable = False
    object.__setattr__(record, name, array)


@dataclass(frozen=True, eq=False)
class MomentColumns:
    """Moment-code records of one code length decoded column by column (``decode_moments``), for restoring a search
    archive from a day of records: the columns the archive keeps, each text field as an index into its distinct
    values, and the records' bytes, so that ``moment(i)`` gives the whole ``MomentCode`` of the few rows replayed."""

    codes: np.ndarray  # uint8 [n, bits / 8]
    starts: np.ndarray  # int64 [n]
    ends: np.ndarray  # int64 [n]
    capture_times: np.ndarray  # float64 [n]
    streams: np.ndarray  # int64 [n], into stream_ids
    stream_ids: list[str]
    sessions: np.ndarray  # int64 [n], into session_ids
    session_ids: list[str]
    models: np.ndarray  # int64 [n], into model_ids
    model_ids: list[str]
    values: list[bytes]

    def __len__(self) -> int:
        return len(self.values)

    def moment(self, row: int) -> MomentCode:
        return decode(self.values[row], MomentCode)


def decode_moments(values: list[bytes], bits: int) -> MomentColumns:
    """The records of ``values`` that ``decode`` reads as ``bits``-bit moment codes, as columns; whatever it would
    refuse (malformed bytes, other record types, flags or lengths, bad spans, times or text) or reads as another code
    length is left out. Vectorised: one pass of numpy over all the records' bytes, and the distinct texts decoded once
    each, rather than a record object per record."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    base = np.zeros(len(values), np.int64)
    np.cumsum(lengths[:-1], out=base[1:])
    buf = np.frombuffer(b"".join(values) + bytes(PREFIX.size + MOMENT_FIELDS.size), np.uint8)  # padded: no overrun

    def field(at: np.ndarray, dtype: str) -> np.ndarray:
        width = np.dtype(dtype).itemsize
        return buf[np.minimum(at, len(buf) - width)[:, None] + np.arange(width)].copy().view(dtype)[:, 0]

    ok = lengths >= PREFIX.size
    ok &= (buf[np.minimum(base, len(buf) - 3)[:, None] + np.arange(3)] == np.frombuffer(MAGIC, np.uint8)).all(axis=1)
    ok &= (field(base + 3, "u1") == _MOMENT_TYPE) & (field(base + 4, "u1") == BINARY_VERSION)
    ok &= (field(base + 5, "u1") | _LAST_FLAG) == _LAST_FLAG
    sid_len = field(base + 6, "<u2").astype(np.int64)
    ok &= (sid_len >= 1) & (sid_len <= MAX_KEY_BYTES)
    at = base + PREFIX.size + sid_len  # the fields
    ok &= lengths >= PREFIX.size + sid_len + MOMENT_FIELDS.size
    starts, ends = field(at, "<i8").astype(np.int64), field(at + 8, "<i8").astype(np.int64)
    capture, emitted = field(at + 16, "<f8").astype(np.float64), field(at + 24, "<f8")
    model_len, session_len = field(at + 34, "<u2").astype(np.int64), field(at + 36, "u1").astype(np.int64)
    ok &= (starts >= 0) & (ends > starts) & np.isfinite(capture) & np.isfinite(emitted)
    ok &= (field(at + 32, "<u2") == bits) & (model_len <= MAX_MODEL_BYTES) & (session_len <= MAX_TAG_BYTES)
    ok &= lengths == PREFIX.size + sid_len + MOMENT_FIELDS.size + model_len + session_len + bits // 8
    ok &= bits % 8 == 0 and 8 <= bits <= MAX_CODE_BITS
    texts = []
    for start, length in ((base + PREFIX.size, sid_len), (at + MOMENT_FIELDS.size, model_len),
                          (at + MOMENT_FIELDS.size + model_len, session_len)):
        index, distinct, bad = _distinct_texts(buf, start, np.where(ok, length, 0))
        ok &= ~bad
        texts.append((index, distinct))
    rows = np.flatnonzero(ok)
    code_at = at[rows] + MOMENT_FIELDS.size + model_len[rows] + session_len[rows]
    codes = buf[code_at[:, None] + np.arange(bits // 8)] if len(rows) else np.empty((0, bits // 8), np.uint8)
    (streams, stream_ids), (models, model_ids), (sessions, session_ids) = texts
    return MomentColumns(codes, starts[rows], ends[rows], capture[rows], streams[rows], stream_ids, sessions[rows],
                         session_ids, models[rows], model_ids, [values[i] for i in rows.tolist()])


def _distinct_texts(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Each row's text (``lengths[i]`` bytes of ``buf`` at ``starts[i]``) as an index into the distinct texts, and
    which rows are not UTF-8."""
    width = max(int(lengths.max(initial=0)), 1)
    columns = np.arange(width)
    raw = np.where(columns < lengths[:, None], buf[np.minimum(starts[:, None] + columns, len(buf) - 1)], 0)
    keyed = np.concatenate([raw.astype(np.uint8), lengths[:, None].astype("<u2").view(np.uint8)], axis=1)
    distinct, index = np.unique(np.ascontiguousarray(keyed).view(f"V{keyed.shape[1]}")[:, 0], return_inverse=True)
    texts, bad = [], np.zeros(len(distinct), bool)
    for j, key in enumerate(distinct.tolist()):
        size = int.from_bytes(key[-2:], "little")
        try:
            texts.append(key[:size].decode("utf-8"))
        except UnicodeDecodeError:
            texts.append("")
            bad[j] = True
    return index.astype(np.int64), texts, bad[index]
