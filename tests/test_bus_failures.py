"""Integration: what the exactly-once loop does when a record keeps failing and when the broker dies under it.

- A record whose transform always raises is retried alone a bounded number of times, then replaced by the poison
  rule's error output in a transaction that commits past it; every other record is processed exactly once, and a
  restarted processor does not meet the poison record again.
- The broker killed (SIGKILL) under a running encoder: the encoder exits non-zero within its bus deadline instead of
  hanging; started again with the broker back, its committed moments equal an uninterrupted run's. Under a live
  producer: it exits non-zero too, since it cannot deliver.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from harness import committed, lite_checkpoint, render_synthetic, spawn, worker_env
from pipeline.bus.kafka import ExactlyOnceProcessor, Outgoing, at_least_once_producer, read_committed_consumer

pytestmark = pytest.mark.integration
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 300}


def drain(processor, expected: int, timeout: float = 60.0) -> None:
    consumed, deadline = 0, time.monotonic() + timeout
    while consumed < expected:
        assert time.monotonic() < deadline, f"consumed {consumed} of {expected}"
        consumed += processor.process_once(timeout_ms=200)


def outputs(bootstrap: str, topic: str) -> list[bytes]:
    consumer = read_committed_consumer([topic], bootstrap=bootstrap)
    try:
        ends = consumer.end_offsets(list(consumer.assignment()))
        values = []
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            values += [r.value for batch in consumer.poll(timeout_ms=500).values() for r in batch]
        return values
    finally:
        consumer.close()


def test_a_poison_record_becomes_an_error_output_and_the_loop_goes_on(kafka_bootstrap, topic_factory):
    source, sink = topic_factory(partitions=2), topic_factory(partitions=1)
    producer = at_least_once_producer(kafka_bootstrap)
    for i in range(20):
        producer.send(source, key=b"k%d" % (i % 4), value=b"rec-%03d" % i)
    producer.flush()
    producer.close()
    attempts, alone = Counter(), Counter()
    flaky = {b"rec-003"}  # fails once, then works: retried, not poisoned

    def transform(records):
        for r in records:
            attempts[r.value] += 1
            alone[r.value] += len(records) == 1
            if r.value == b"rec-007" or r.value in flaky:
                flaky.discard(r.value)
                raise ValueError(f"cannot process {r.value!r}")
            yield Outgoing(sink, r.value.upper(), key=r.key)

    def poison(record, error):
        return [Outgoing(sink, b"POISON %s: %s" % (record.value, str(error).encode()), key=record.key)]

    group, tid = f"g-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}"
    with ExactlyOnceProcessor([source], group, tid, transform, poison=poison, max_attempts=3,
                              bootstrap=kafka_bootstrap, consumer_config=FAST_GROUP) as processor:
        drain(processor, 20)
    assert alone[b"rec-007"] == 3  # after its batch failed, alone until the attempts ran out
    values = Counter(outputs(kafka_bootstrap, sink))
    want = Counter(b"REC-%03d" % i for i in range(20) if i != 7)
    want[b"POISON rec-007: cannot process b'rec-007'"] = 1
    assert values == want
    attempts.clear()
    with ExactlyOnceProcessor([source], group, tid, transform, poison=poison, bootstrap=kafka_bootstrap,
                              consumer_config=FAST_GROUP) as restarted:
        for _ in range(10):
            assert restarted.process_once(timeout_ms=200) == 0
    assert not attempts  # committed past: the restarted processor never sees it


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which the test may kill and start again on the same data."""
    from pipeline.bus.broker import ensure_broker, free_port_pair, stop_broker

    port, data = free_port_pair(), tmp_path / "kafka"
    yield port, data, ensure_broker(port, data_dir=data)
    stop_broker(port)


def test_the_broker_killed_under_a_running_encoder(own_broker, tmp_path):
    from pipeline.bus.broker import broker_status, ensure_broker
    from pipeline.bus.records import FrameFeatures, MomentCode, encode, extractor_id
    from pipeline.bus.topics import create_topics, topics
    from pipeline.codes.live import LiveCoder
    from pipeline.model import StreamingEncoder, load_checkpoint

    port, data, bootstrap = own_broker
    prefix = f"kill-broker-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, prefix=prefix, partitions=1)
    names = topics(prefix)
    checkpoint = lite_checkpoint(tmp_path / "lite")
    identity = json.loads((checkpoint / "config.json").read_text())["extractor"]
    rng = np.random.default_rng(0)
    features = [FrameFeatures("s", t, float(t), 1.7e9 + t, rng.normal(size=identity["dim"]), session="one",
                              extractor=extractor_id(identity)) for t in range(120)]
    features[-1] = replace(features[-1], last=True)
    producer = at_least_once_producer(bootstrap)
    for record in features:
        producer.send(names.features, key=b"s", value=encode(record))
    producer.flush()
    producer.close()
    model, _ = load_checkpoint(checkpoint)
    expected, _ = LiveCoder(StreamingEncoder(model), model.config.bits, "").encode(features)

    env = worker_env(bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint), VMH_BUS_TIMEOUT="5")
    args = ["encoder", "--instance", "k", "--batch-records", "1"]
    encoder = spawn(args, env, tmp_path / "encoder.log")
    committed(bootstrap, names.moments, lambda r: len(r) >= 200, expected=MomentCode)
    os.kill(broker_status(port).pid, signal.SIGKILL)
    killed = time.monotonic()
    code = encoder.wait(30)
    assert code == 3, (tmp_path / "encoder.log").read_text()[-3000:]
    assert time.monotonic() - killed < 5 + 15  # the bus deadline, plus closing (3 s a client) on a busy machine
    assert "giving up on the bus" in (tmp_path / "encoder.log").read_text()

    ensure_broker(port, data_dir=data)
    again = spawn(args, env, tmp_path / "encoder2.log")
    try:
        moments = committed(bootstrap, names.moments, lambda r: len(r) >= len(expected), expected=MomentCode)
        time.sleep(2)
        moments = committed(bootstrap, names.moments, expected=MomentCode)
    finally:
        again.terminate()
        again.wait(10)
    key = lambda m: (m.stream_id, m.start, m.end, m.code.tobytes(), m.last)  # noqa: E731
    assert Counter(map(key, moments)) == Counter(map(key, expected))


def test_a_producer_that_cannot_deliver_exits(own_broker, tmp_path):
    """Deliveries are checked: with the broker gone, a live producer exits non-zero within its deadline, saying
    so, instead of decoding on and dropping what it cannot send."""
    from pipeline.bus.broker import broker_status
    from pipeline.bus.records import FrameFeatures
    from pipeline.bus.topics import create_topics, topics

    port, _, bootstrap = own_broker
    prefix = f"no-delivery-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, prefix=prefix, partitions=1)
    env = worker_env(bootstrap, prefix, VMH_BUS_TIMEOUT="5")
    video = render_synthetic(tmp_path / "live.mp4", duration=8.0)
    producer = spawn(["producer", f"live={video}", "--realtime", "--loop"], env, tmp_path / "producer.log")
    try:
        committed(bootstrap, topics(prefix).features, lambda r: len(r) >= 2, expected=FrameFeatures)
        os.kill(broker_status(port).pid, signal.SIGKILL)
        killed = time.monotonic()
        assert producer.wait(30) == 3, (tmp_path / "producer.log").read_text()[-3000:]
        assert time.monotonic() - killed < 5 + 15  # the delivery deadline, plus a batch and closing
        assert "cannot deliver to Kafka" in (tmp_path / "producer.log").read_text()
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
