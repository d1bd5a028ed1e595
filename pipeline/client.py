"""The Python client: push streams, register standing queries, iterate match events, search the recent past.

    client = Client()                      # bootstrap servers and topic prefix from the settings
    client.add_query("a red circle moves to the left", query_id="red-left", threshold=24)
    producer = client.push({"cam1": "rtsp://camera/stream"}, realtime=True)
    for event in client.matches(query_id="red-left"):
        print(event.stream_id, event.start, event.end, event.distance)

Queries are records on the log-compacted queries topic (latest record per id wins, a tombstone deletes), so
registering is at-least-once and idempotent: sending the same query twice leaves one query.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Iterator

import numpy as np

from pipeline.bus.kafka import BusTimeout, at_least_once_producer, bootstrap_servers, read_committed_consumer
from pipeline.bus.records import InvalidQuery, MalformedRecord, MatchEvent, StandingQuery, decode, encode, key_text
from pipeline.bus.topics import topics
from pipeline.matching.search import SearchRequest

class Client:
    """``checkpoint``, where the client can read it, supplies the threshold of queries added without one: the
    threshold calibrated with the model (its config's ``threshold``). Without it such queries are registered with
    no threshold, and the query worker gives them its model's."""

    def __init__(self, bootstrap: str | None = None, prefix: str | None = None, checkpoint: str | None = None) -> None:
        self.bootstrap = bootstrap_servers(bootstrap)
        self.topics = topics(prefix)
        self.checkpoint = checkpoint or None

    @property
    def default_threshold(self) -> int | None:
        """The checkpoint's calibrated threshold, None without a checkpoint or calibration."""
        from pipeline.model.checkpoint import calibrated_threshold

        return calibrated_threshold(self.checkpoint) if self.checkpoint else None

    def add_query(self, text: str | None = None, *, code: bytes | np.ndarray | None = None, query_id: str | None = None,
                  threshold: int | None = None) -> str:
        """Register (or replace) a standing query given as text, or as a raw packed code; returns its id. Without a
        threshold it takes the model's calibrated one (see the class). Text longer than the sentence encoder's
        token window is refused here (``InvalidQuery``), as the workers would."""
        from pipeline.features.sentence import TextTooLong, check_length

        query_id = query_id or uuid.uuid4().hex[:12]
        threshold = self.default_threshold if threshold is None else threshold
        if code is not None:
            code = np.frombuffer(bytes(code), np.uint8) if not isinstance(code, np.ndarray) else code.astype(np.uint8)
            query = StandingQuery(query_id, text, code, code.size * 8, threshold, time.time())
        else:
            if text is None:
                raise InvalidQuery("a query needs a text or a code")
            query = StandingQuery(query_id, text, None, 0, threshold, time.time())
            try:
                check_length([text])
            except TextTooLong as e:
                raise InvalidQuery(f"query {query_id!r}: {e}; shorten it") from None
        self._send(query_id, encode(query))
        return query_id

    def remove_query(self, query_id: str) -> None:
        """Delete a standing query (a tombstone on the compacted topic)."""
        self._send(query_id, None)

    def queries(self, timeout: float = 30.0) -> dict[str, StandingQuery]:
        """The registered queries, read from the whole queries topic within ``timeout`` seconds (else
        ``BusTimeout``). Records that are not queries are left out (the query workers report them)."""
        consumer = read_committed_consumer([self.topics.queries], bootstrap=self.bootstrap)
        try:
            ends = consumer.end_offsets(list(consumer.assignment()))
            current: dict[str, StandingQuery] = {}
            deadline = time.monotonic() + timeout
            while any(consumer.position(tp) < end for tp, end in ends.items()):
                if time.monotonic() > deadline:
                    raise BusTimeout(f"reading {self.topics.queries} took more than {timeout:g} s")
                for batch in consumer.poll(timeout_ms=500).values():
                    for record in batch:
                        key = key_text(record.key, "")
                        if record.value is None:
                            current.pop(key, None)
                            continue
                        try:
                            current[key] = decode(record.value, StandingQuery)
                        except MalformedRecord:
                            continue
            return current
        finally:
            consumer.close()

    def subscribe(self, query_id: str | None = None, stream_id: str | None = None, *,
                  from_beginning: bool = False) -> MatchSubscription:
        """A subscription to committed match events, optionally filtered; poll it, close it when done."""
        consumer = read_committed_consumer([self.topics.matches], from_beginning=from_beginning,
                                           bootstrap=self.bootstrap)
        for tp in consumer.assignment():
            consumer.position(tp)  # fix the start now, not at the first poll
        return MatchSubscription(consumer, query_id, stream_id)

    def matches(self, query_id: str | None = None, stream_id: str | None = None, *, from_beginning: bool = False,
                timeout: float | None = None) -> Iterator[MatchEvent]:
        """Match events as they are committed, optionally filtered; ends after ``timeout`` seconds without one."""
        subscription = self.subscribe(query_id, stream_id, from_beginning=from_beginning)
        try:
            idle_since = time.monotonic()
            while timeout is None or time.monotonic() - idle_since < timeout:
                events = subscription.poll(0.5)
                if events:
                    idle_since = time.monotonic()
                yield from events
        finally:
            subscription.close()

    def search(self, text: str | None = None, *, code: bytes | None = None, since: float | None = None,
               until: float | None = None, top_k: int = 10, timeout: float = 10.0) -> list[dict]:
        """Top-k archived moments nearest to a text or code, merged from every query worker's reply.

        Waits until the replies cover every partition of the moments topic, or ``timeout``. ``top_k`` is at most
        ``MAX_TOP_K``; a reply cut to fit the size limit gives fewer hits."""
        request = SearchRequest(uuid.uuid4().hex, text, None if code is None else bytes(code), since, until, top_k)
        request_id = request.request_id
        replies = read_committed_consumer([self.topics.search_replies], from_beginning=False, bootstrap=self.bootstrap)
        try:
            for tp in replies.assignment():
                replies.position(tp)  # fix the start before the request goes out
            self._send(request_id, request.encode(), topic=self.topics.search_requests)
            partitions = len(replies.partitions_for_topic(self.topics.moments) or ())
            covered: set[int] = set()
            hits: list[dict] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (len(covered) < partitions or not partitions):
                for batch in replies.poll(timeout_ms=200).values():
                    for record in batch:
                        reply = json.loads(record.value)
                        if reply.get("request_id") != request_id:
                            continue
                        if reply.get("error"):
                            raise InvalidQuery(f"search failed: {reply['error']}")
                        # each partition's hits from the first reply that holds it: during a rebalance two
                        # workers may both answer for one partition
                        fresh = set(reply.get("partitions", ())) - covered
                        covered |= fresh
                        hits += [hit for hit in reply["hits"] if hit.get("partition") in fresh]
            hits.sort(key=lambda h: (h["distance"], -h["capture_time"]))
            return hits[:top_k]
        finally:
            replies.close()

    def push(self, sources: dict[str, str], *, realtime: bool = False, loop: bool = False) -> subprocess.Popen:
        """Start a producer process for ``{stream id: source}``; stop it with ``.terminate()``."""
        args = [f"{stream_id}={source}" for stream_id, source in sources.items()]
        flags = ["--realtime"] * realtime + ["--loop"] * loop
        return subprocess.Popen([sys.executable, "-m", "workers.cli", "producer", *args, *flags,
                                 "--bootstrap-servers", self.bootstrap, "--topic-prefix", self.topics.prefix])

    def _send(self, key: str, value: bytes | None, topic: str | None = None) -> None:
        producer = at_least_once_producer(self.bootstrap)
        try:
            producer.send(topic or self.topics.queries, key=key.encode(), value=value).get(timeout=30)
        finally:
            producer.close()


class MatchSubscription:
    """Committed match events of a consumer, filtered by query and stream."""

    def __init__(self, consumer, query_id: str | None, stream_id: str | None) -> None:
        self.consumer, self.query_id, self.stream_id = consumer, query_id, stream_id

    def poll(self, timeout_s: float = 0.5) -> list[MatchEvent]:
        events = [decode(r.value, MatchEvent) for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values()
                  for r in batch]
        return [e for e in events if (self.query_id is None or e.query_id == self.query_id)
                and (self.stream_id is None or e.stream_id == self.stream_id)]

    def close(self) -> None:
        self.consumer.close()
