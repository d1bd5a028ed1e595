"""Retrospective search over the bus: the request `vmh search` broadcasts and the reply every query worker sends.

Requests are JSON on ``<prefix>.search-requests``; each query worker answers on ``<prefix>.search-replies`` with its
top-k over the partitions it holds completely, keyed by the request id, and the client merges replies until every
partition of the moments topic is covered. A request is checked field by field before anything in it is used, and
a reply is cut to fit the producer's size limit (``truncated`` says so), so no request can make a worker's send
fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.bus.records import MAX_QUERY_CHARS, InvalidQuery

BAD_SEARCH_REQUEST = "bad_search_request"  # the kind of the error record about a request that cannot be answered
MAX_TOP_K = 1000
MAX_REQUEST_ID_BYTES = 128
MAX_ERROR_CHARS = 1000


class BadSearchRequest(InvalidQuery):
    """A search request that cannot be answered; ``request_id`` is its id when that much could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class SearchRequest:
    request_id: str
    text: str | None = None
    code: bytes | None = None
    since: float | None = None
    until: float | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        if not _request_id(self.request_id):
            raise BadSearchRequest(f"request_id must be a string of 1 to {MAX_REQUEST_ID_BYTES} bytes of UTF-8")
        rid = self.request_id
        if self.code is None and not (isinstance(self.text, str) and self.text.strip()):
            raise BadSearchRequest("a search needs a non-empty text or a code", rid)
        if self.text is not None and (not isinstance(self.text, str) or len(self.text) > MAX_QUERY_CHARS):
            raise BadSearchRequest(f"text must be a string of at most {MAX_QUERY_CHARS} characters", rid)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= MAX_TOP_K:
            raise BadSearchRequest(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {self.top_k!r}", rid)
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise BadSearchRequest(f"{name} must be a finite time in seconds or null, got {value!r}", rid)

    def encode(self) -> bytes:
        return json.dumps({"type": "search_request", "request_id": self.request_id, "text": self.text,
                           "code": None if self.code is None else self.code.hex(), "since": self.since,
                           "until": self.until, "top_k": self.top_k}).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> SearchRequest:
        """The request in ``value``; raises ``BadSearchRequest`` saying what is wrong."""
        try:
            obj = json.loads(value) if value is not None else None
        except (ValueError, TypeError, RecursionError):
            raise BadSearchRequest("a search request must be UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise BadSearchRequest("a search request must be a JSON object")
        request_id = obj.get("request_id")
        rid = request_id if _request_id(request_id) else None
        code = obj.get("code")
        if code is not None:
            try:
                code = bytes.fromhex(code)
            except (TypeError, ValueError):
                raise BadSearchRequest("code must be hex", rid) from None
        return cls(request_id, obj.get("text"), code, obj.get("since"), obj.get("until"), obj.get("top_k", 10))


def encode_reply(request_id: str, hits: Sequence[dict[str, Any]], partitions: Sequence[int], error: str | None,
                 max_bytes: int) -> bytes:
    """A reply of at most ``max_bytes``: the best hits that fit (``truncated`` when some were cut)."""
    error = None if error is None else error[:MAX_ERROR_CHARS]

    def reply(count: int) -> bytes:
        return json.dumps({"type": "search_reply", "request_id": request_id, "error": error,
                           "partitions": list(partitions), "hits": list(hits[:count]),
                           "truncated": count < len(hits)}).encode()

    data = reply(len(hits))
    if len(data) <= max_bytes:
        return data
    low, high = 0, len(hits)  # reply(low) fits, reply(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(reply(middle)) <= max_bytes else (low, middle)
    return reply(low)


def _request_id(value: Any) -> bool:
    """Whether ``value`` can be a request id, which keys the reply."""
    if not isinstance(value, str) or not value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_REQUEST_ID_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False
