"""What the web view shows, built from bus records: the pure state behind `vmh ui`, without Kafka or HTTP.

Every record goes through :meth:`LiveView.apply`, which updates the state and returns the events to push to open
pages (or none); :meth:`LiveView.snapshot` is what a page gets when it connects. Records that do not decode are
skipped: the workers that consume those topics report them, and the view only shows. Key frames are held in memory
up to a byte budget, oldest first out, so a match or search hit shows the frames of its seconds while they are
recent; older hits show their text only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from pipeline.bus.records import (CORRUPT_VIDEO, DEAD_SOURCE, ErrorRecord, Keyframe, MalformedRecord, MatchEvent,
                                   StandingQuery, decode, key_text)

STRIP = 8  # most key frames shown for one moment, evenly spread over its seconds
RECENT_MATCHES = 200
Event = dict[str, Any]


@dataclass
class StreamState:
    session: str = ""
    seconds: int = 0  # seconds seen in the current producer session
    latest: int | None = None  # t of the latest key frame
    capture_time: float = 0.0
    error: dict | None = None  # the stream's last error record

    def as_json(self, stream_id: str) -> dict:
        return {"stream_id": stream_id, "seconds": self.seconds, "latest": self.latest,
                "capture_time": self.capture_time, "error": self.error}


class LiveView:
    """Streams, standing queries, recent match events and key frames; safe to use from the consumer thread and
    the web server's threads at once."""

    def __init__(self, keyframe_bytes: int = 256 * 2**20) -> None:
        self.keyframe_bytes = keyframe_bytes
        self._lock = threading.Lock()
        self._streams: dict[str, StreamState] = {}
        self._queries: dict[str, StandingQuery] = {}
        self._matches: deque[Event] = deque(maxlen=RECENT_MATCHES)
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._held_bytes = 0

    def apply(self, kind: str, key: bytes | None, value: bytes | None) -> list[Event]:
        """One record of the ``kind`` topic (keyframes, matches, errors, queries); the events it causes."""
        try:
            with self._lock:
                if kind == "queries":
                    return self._query(key_text(key, ""), None if value is None else decode(value, StandingQuery))
                if value is None:
                    return []
                if kind == "keyframes":
                    return self._keyframe(decode(value, Keyframe))
                if kind == "matches":
                    return self._match(decode(value, MatchEvent))
                if kind == "errors":
                    return self._error(decode(value, ErrorRecord))
        except MalformedRecord:
            return []
        raise ValueError(f"the view reads no {kind!r} topic")

    def snapshot(self) -> Event:
        with self._lock:
            return {"type": "snapshot", "streams": [s.as_json(i) for i, s in sorted(self._streams.items())],
                    "queries": [_query_json(q) for _, q in sorted(self._queries.items())],
                    "matches": list(self._matches)}

    def keyframe(self, stream_id: str, t: int) -> bytes | None:
        with self._lock:
            return self._frames.get((stream_id, t))

    def strip(self, stream_id: str, start: int, end: int) -> list[int]:
        """The seconds of [start, end) to show a moment by: at most ``STRIP`` of those whose key frame is held."""
        with self._lock:
            return self._strip(stream_id, start, end)

    def _strip(self, stream_id: str, start: int, end: int) -> list[int]:
        held = [t for t in range(start, end) if (stream_id, t) in self._frames]
        if len(held) <= STRIP:
            return held
        return [held[round(i * (len(held) - 1) / (STRIP - 1))] for i in range(STRIP)]

    def _keyframe(self, frame: Keyframe) -> list[Event]:
        stream = self._streams.setdefault(frame.stream_id, StreamState())
        if frame.session != stream.session:  # a new producer session numbers its seconds from 0 again
            stream.session, stream.seconds, stream.latest = frame.session, 0, None
        stream.seconds = max(stream.seconds, frame.t + 1)
        if stream.latest is None or frame.t >= stream.latest:
            stream.latest, stream.capture_time = frame.t, frame.capture_time
        key = (frame.stream_id, frame.t)
        self._held_bytes += len(frame.jpeg) - len(self._frames.pop(key, b""))
        self._frames[key] = frame.jpeg
        while self._held_bytes > self.keyframe_bytes and len(self._frames) > 1:
            self._held_bytes -= len(self._frames.popitem(last=False)[1])
        return [{"type": "stream", **stream.as_json(frame.stream_id)}]

    def _match(self, event: MatchEvent) -> list[Event]:
        query = self._queries.get(event.query_id)
        shown = {"type": "match", "query_id": event.query_id, "text": query.text if query else None,
                 "stream_id": event.stream_id, "start": event.start, "end": event.end, "distance": event.distance,
                 "bits": event.bits, "latency": round(event.latency, 3), "match_time": event.match_time,
                 "frames": self._strip(event.stream_id, event.start, event.end)}
        self._matches.append(shown)
        return [shown]

    def _error(self, error: ErrorRecord) -> list[Event]:
        shown = {"kind": error.kind, "message": error.message, "time": error.time}
        if error.source in self._streams or error.kind in (CORRUPT_VIDEO, DEAD_SOURCE):
            stream = self._streams.setdefault(error.source, StreamState())
            stream.error = shown
            return [{"type": "stream", **stream.as_json(error.source)}]
        return [{"type": "problem", "source": error.source, **shown}]

    def _query(self, query_id: str, query: StandingQuery | None) -> list[Event]:
        if query is None:
            return [{"type": "query-removed", "query_id": query_id}] if self._queries.pop(query_id, None) else []
        self._queries[query_id] = query
        return [{"type": "query", **_query_json(query)}]


def _query_json(query: StandingQuery) -> dict:
    return {"query_id": query.query_id, "text": query.text, "threshold": query.threshold, "bits": query.bits,
            "created_time": query.created_time}
