"""Integration: records and requests that are well-formed on the wire but wrong in meaning, against the real broker,
with a healthy live stream running alongside every case.

For each case an error record names it, the workers stay up and the healthy stream's moments and matches go on;
at the end both workers are stopped with SIGTERM (within 10 s) and restarted on the same log, and stay up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest

from harness import ROOT, committed, lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.records import ErrorRecord, FrameFeatures, MatchEvent, MomentCode, StandingQuery, encode, extractor_id
from pipeline.bus.topics import create_topics, topics

pytestmark = pytest.mark.integration


class System:
    """Encoder, query worker and a looping live producer on one topic set; raw records sent beside them."""

    def __init__(self, bootstrap, tmp):
        from pipeline.bus.kafka import at_least_once_producer
        from pipeline.client import Client

        self.bootstrap, self.tmp = bootstrap, tmp
        self.prefix = f"hostile-{uuid.uuid4().hex[:8]}"
        self.names = topics(self.prefix)
        create_topics(bootstrap, prefix=self.prefix, partitions=2)
        self.checkpoint = lite_checkpoint(tmp / "lite")
        self.identity = json.loads((self.checkpoint / "config.json").read_text())["extractor"]
        self.env = worker_env(bootstrap, self.prefix, VMH_CHECKPOINT=str(self.checkpoint))
        self.client = Client(bootstrap, self.prefix)
        self.client.add_query(code=bytes(16), query_id="anything", threshold=128)
        self.raw = at_least_once_producer(bootstrap)
        video = render_synthetic(tmp / "live.mp4", duration=8.0)
        self.producer = spawn(["producer", f"live={video}", "--realtime", "--loop"], self.env, tmp / "producer.log")
        self.workers = {}
        self.start_workers()

    def start_workers(self):
        self.workers = {
            "encoder": spawn(["encoder", "--instance", "h"], self.env, self.tmp / "encoder.log"),
            "query": spawn(["query-worker", "--instance", "h"], self.env, self.tmp / "query.log"),
        }

    def features(self, stream, seconds, session="raw", **fields):
        """Feature records of the checkpoint's extractor (unless ``fields`` say otherwise) for ``seconds``."""
        rng = np.random.default_rng(len(stream))
        extractor = extractor_id(self.identity)
        return [FrameFeatures(stream, t, float(t), time.time(), rng.normal(size=self.identity["dim"]), session=session,
                              extractor=extractor, **fields) for t in seconds]

    def send(self, topic, records=(), raw=()):
        for record in records:
            key = record.stream_id if hasattr(record, "stream_id") else record.query_id
            self.raw.send(topic, key=key.encode(), value=encode(record))
        for key, value in raw:
            self.raw.send(topic, key=key, value=value)
        self.raw.flush()

    def errors(self, check, timeout=90.0):
        return committed(self.bootstrap, self.names.errors, lambda r: any(map(check, r)), timeout=timeout,
                         expected=ErrorRecord)

    def moments(self, check, timeout=90.0):
        return committed(self.bootstrap, self.names.moments, check, timeout=timeout, expected=MomentCode,
                         skip_malformed=True)

    def assert_healthy(self):
        """Both workers run, and the live stream gets new moments and new matches."""
        for name, process in self.workers.items():
            assert process.poll() is None, f"{name} exited: " + (self.tmp / f"{name}.log").read_text()[-3000:]
        moments = committed(self.bootstrap, self.names.moments, expected=MomentCode, skip_malformed=True)
        matches = committed(self.bootstrap, self.names.matches, expected=MatchEvent)
        before = (sum(m.stream_id == "live" for m in moments), sum(e.stream_id == "live" for e in matches))
        self.moments(lambda r: sum(m.stream_id == "live" for m in r) > before[0])
        committed(self.bootstrap, self.names.matches, lambda r: sum(e.stream_id == "live" for e in r) > before[1],
                  timeout=90, expected=MatchEvent)

    def close(self):
        for process in (self.producer, *self.workers.values()):
            stop(process)
        self.raw.close()


@pytest.fixture(scope="module")
def system(kafka_bootstrap, tmp_path_factory):
    system = System(kafka_bootstrap, tmp_path_factory.mktemp("hostile"))
    try:
        system.moments(lambda r: any(m.stream_id == "live" for m in r), timeout=120)
        yield system
    finally:
        system.close()


def test_features_of_the_wrong_width(system):
    system.send(system.names.features, [replace(r, features=np.ones(512)) for r in system.features("narrow", range(3))])
    errors = system.errors(lambda e: e.source == "narrow")
    bad = [e for e in errors if e.source == "narrow"]
    assert bad[0].kind == "bad_features" and "512-d" in bad[0].message
    assert bad[0].context["topic"] == system.names.features and "offset" in bad[0].context
    system.assert_healthy()


def test_features_of_another_extractor(system):
    resnet = dict(system.identity, backbone="resnet18", dim=512)
    records = [replace(r, features=np.ones(512), extractor=extractor_id(resnet))
               for r in system.features("resnet", range(3))]
    system.send(system.names.features, records)
    errors = system.errors(lambda e: e.source == "resnet")
    assert {e.kind for e in errors if e.source == "resnet"} == {"foreign_extractor"}
    assert "resnet18" in next(e.message for e in errors if e.source == "resnet")
    system.assert_healthy()


def test_features_with_nan(system):
    records = system.features("nan", range(2))
    poisoned = records[1].features.astype(np.float32)
    poisoned[7] = np.nan
    system.send(system.names.features, [records[0], replace(records[1], features=poisoned)])
    errors = system.errors(lambda e: e.source == "nan")
    assert [(e.kind, e.context["t"]) for e in errors if e.source == "nan"] == [("bad_features", 1)]
    system.assert_healthy()


def test_garbage_with_a_long_non_ascii_key(system):
    key = ("é" * 150).encode()  # 300 bytes of UTF-8: more than an error record's source may hold
    system.send(system.names.features, raw=[(key, b"\x00not a record")])
    system.send(system.names.moments, raw=[(key, b"VMH\x02")])
    def malformed_on(topic):
        return lambda e: e.kind == "malformed_record" and e.context["topic"] == topic

    system.errors(malformed_on(system.names.features))  # the encoder's and the query worker's come in either order
    errors = system.errors(malformed_on(system.names.moments))
    sources = {e.context["topic"]: e.source for e in errors if e.kind == "malformed_record"}
    assert sources == {system.names.features: "é" * 128, system.names.moments: "é" * 128}
    system.assert_healthy()


def test_a_missing_second_is_bridged_and_the_stream_resumes(system):
    system.send(system.names.features, system.features("gappy", [*range(10), *range(15, 30)]))
    errors = system.errors(lambda e: e.source == "gappy")
    gap = [e for e in errors if e.source == "gappy"]
    assert gap[0].kind == "history_incomplete" and "10 to 14" in gap[0].message
    moments = system.moments(lambda r: any(m.stream_id == "gappy" and m.end == 30 for m in r))
    ends = {m.end for m in moments if m.stream_id == "gappy"}
    assert ends == set(range(1, 11)) | set(range(16, 31))  # nothing for the missing seconds, all after them
    system.assert_healthy()


def test_a_stream_that_ends_mid_cluster_is_flushed(system):
    from pipeline.codes.live import LiveCoder
    from pipeline.model import StreamingEncoder, load_checkpoint

    records = system.features("ender", range(6))
    records[-1] = replace(records[-1], last=True)
    model, _ = load_checkpoint(system.checkpoint)
    offline, _ = LiveCoder(StreamingEncoder(model), model.config.bits, "").encode(records)
    final = offline[-1]
    assert final.last and final.end == 6
    # a query for the final moment only: its cluster is due at second 6 + settle, which never comes
    system.client.add_query(code=final.code, query_id="final", threshold=0)
    time.sleep(2)  # the query worker applies queries between batches
    system.send(system.names.features, records)
    events = committed(system.bootstrap, system.names.matches,
                       lambda r: any(e.query_id == "final" for e in r), timeout=90, expected=MatchEvent)
    assert [(e.stream_id, e.start, e.end, e.distance) for e in events if e.query_id == "final"] == [
        ("ender", final.start, final.end, 0)]
    system.assert_healthy()


def test_an_overlong_query_is_refused_where_it_enters_and_where_it_is_used(system):
    from pipeline.bus.records import InvalidQuery

    text = "漢" * 1000
    with pytest.raises(InvalidQuery, match="token window"):
        system.client.add_query(text, query_id="cjk")
    cli = subprocess.run([sys.executable, "-m", "workers.cli", "query", "add", text, "--id", "cjk"], env=system.env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "1002 tokens" in cli.stderr and "256-token window" in cli.stderr
    # written past the client, straight onto the compacted queries topic
    system.send(system.names.queries, [StandingQuery("cjk", text, None, 0, 24, time.time())])
    errors = system.errors(lambda e: e.source == "cjk")
    assert [(e.kind, e.context["topic"]) for e in errors if e.source == "cjk"] == [("bad_query", system.names.queries)]
    system.assert_healthy()


def test_a_search_for_too_many_hits(system):
    from pipeline.bus.kafka import read_committed_consumer
    from pipeline.bus.records import InvalidQuery

    with pytest.raises(InvalidQuery, match="top_k must be an integer from 1 to 1000"):
        system.client.search(code=bytes(16), top_k=100_000)
    cli = subprocess.run([sys.executable, "-m", "workers.cli", "search", "--code", "00" * 16, "--top-k", "100000"],
                         env=system.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "top_k must be an integer from 1 to 1000, got 100000" in cli.stderr
    replies = read_committed_consumer([system.names.search_replies], from_beginning=False, bootstrap=system.bootstrap)
    try:
        for tp in replies.assignment():
            replies.position(tp)
        request = {"type": "search_request", "request_id": "huge", "code": "00" * 16, "top_k": 100_000}
        nameless = {"type": "search_request", "request_id": "x" * 10_000, "code": "00" * 16}
        system.send(system.names.search_requests, raw=[(b"\xff" * 300, b"\xff\xfe not JSON"),
                                                       (None, json.dumps(nameless).encode()),
                                                       (b"\xff" * 300, json.dumps(request).encode())])
        deadline, got = time.monotonic() + 60, []
        while not got and time.monotonic() < deadline:
            got = [json.loads(r.value) for batch in replies.poll(timeout_ms=500).values() for r in batch]
    finally:
        replies.close()
    assert got and got[0]["request_id"] == "huge" and "1000" in got[0]["error"] and got[0]["hits"] == []
    errors = system.errors(lambda e: e.kind == "bad_search_request" and "top_k" in e.message)
    assert sum(e.kind == "bad_search_request" for e in errors) == 3
    hits = system.client.search(code=bytes(16), top_k=1000)  # the largest allowed, answered within the size limit
    assert 0 < len(hits) <= 1000
    system.assert_healthy()


def test_stopped_workers_stop_in_time_and_restart_on_the_same_log(system):
    for name, process in system.workers.items():
        started = time.monotonic()
        process.terminate()
        assert process.wait(10) == 0, name
        assert time.monotonic() - started < 10
    reported = sum(e.source == "cjk" for e in committed(system.bootstrap, system.names.errors, expected=ErrorRecord))
    system.start_workers()
    # the query worker reads the compacted queries topic again, reports the unusable query again, and lives on
    committed(system.bootstrap, system.names.errors, lambda r: sum(e.source == "cjk" for e in r) > reported,
              timeout=120, expected=ErrorRecord)
    system.assert_healthy()
    system.producer.terminate()
    assert system.producer.wait(10) == 0
