"""Integration: kill -9 the encoder or the query worker mid-stream and restart it; the read_committed output equals
that of an uninterrupted run (computed offline by the same pure logic), without duplicates. Real broker, real
video, real model; one record per transaction, so a kill lands between and inside transactions."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from harness import committed, lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.kafka import at_least_once_producer
from pipeline.bus.records import FrameFeatures, MatchEvent, MomentCode, encode, record_key
from pipeline.bus.topics import create_topics, topics
from pipeline.codes.live import LiveCoder
from pipeline.matching.live import LiveMatcher
from pipeline.model import StreamingEncoder, get_preset, load_checkpoint, moments_ending_at

pytestmark = pytest.mark.integration
SECONDS = 45  # longer than the lite receptive field (27 s), so a restart must rebuild state from the log


@pytest.fixture(scope="module")
def stream(kafka_bootstrap, tmp_path_factory):
    """Features of one real rendered video on a fresh topic set, and the checkpoint the workers use."""
    tmp = tmp_path_factory.mktemp("recovery")
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    checkpoint = lite_checkpoint(tmp / "lite")
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    video = render_synthetic(tmp / "long.mp4", duration=SECONDS, seed=5)
    producer = spawn(["producer", f"long={video}"], env, tmp / "producer.log")
    assert producer.wait(240) == 0
    features = committed(kafka_bootstrap, topics(prefix).features, expected=FrameFeatures)
    assert len({r.t for r in features}) == SECONDS and features[-1].last  # the stream's seconds and its end
    return prefix, env, checkpoint, features, tmp


def kill_and_restart(args, env, log, ready) -> None:
    """Start a worker, SIGKILL it as soon as ``ready()`` (some output committed), start it again."""
    victim = spawn(args, env, log)
    deadline = time.monotonic() + 120
    while not ready():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    ready.close()
    return spawn(args, env, log)


class committed_at_least:
    """A check that turns true once ``count`` records of ``topic`` are committed."""

    def __init__(self, bootstrap, topic, count):
        from pipeline.bus.kafka import read_committed_consumer

        self.consumer, self.count, self.seen = read_committed_consumer([topic], bootstrap=bootstrap), count, 0

    def __call__(self) -> bool:
        self.seen += sum(len(batch) for batch in self.consumer.poll(timeout_ms=100).values())
        return self.seen >= self.count

    def close(self) -> None:
        self.consumer.close()


def test_encoder_killed_mid_stream(kafka_bootstrap, stream):
    prefix, env, checkpoint, features, tmp = stream
    _kill_encoder_and_compare(kafka_bootstrap, prefix, env, checkpoint, features, tmp / "encoder.log")


def test_encoder_killed_after_seconds_were_shed(kafka_bootstrap, stream):
    """Seconds 14 to 17 shed, as an overloaded producer sheds them (they keep their numbers; the record after the
    hole says so): the restarted encoder's window reaches back across the hole, and its codes are still those of an
    uninterrupted run."""
    _, _, checkpoint, features, tmp = stream
    prefix = f"shed-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    shed = [replace(r, gap=True, gap_seconds=4.0) if r.t == 18 else r for r in features if not 14 <= r.t < 18]
    producer = at_least_once_producer(kafka_bootstrap)
    for record in shed:
        producer.send(topics(prefix).features, value=encode(record), key=record_key(record))
    producer.flush()
    producer.close()
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    _kill_encoder_and_compare(kafka_bootstrap, prefix, env, checkpoint, shed, tmp / "encoder-shed.log")


def _kill_encoder_and_compare(kafka_bootstrap, prefix, env, checkpoint, features, log) -> None:
    model, _ = load_checkpoint(checkpoint)
    coder = LiveCoder(StreamingEncoder(model), bits=model.config.bits, model="")
    expected, _ = coder.encode(features)
    args = ["encoder", "--instance", f"kill-{prefix}", "--batch-records", "1"]
    # killed around second 30 of 45: the restarted worker needs the full 27 s window of history
    ready = committed_at_least(kafka_bootstrap, topics(prefix).moments, 300)
    restarted = kill_and_restart(args, env, log, ready)
    try:
        moments = committed(kafka_bootstrap, topics(prefix).moments, lambda r: len(r) >= len(expected),
                            expected=MomentCode)
        time.sleep(2)
        moments = committed(kafka_bootstrap, topics(prefix).moments, expected=MomentCode)
    finally:
        stop(restarted)
    key = lambda m: (m.stream_id, m.start, m.end, m.code.tobytes())  # noqa: E731
    assert Counter(map(key, moments)) == Counter(map(key, expected))  # same set, nothing twice


def test_query_worker_killed_mid_stream(kafka_bootstrap, stream):
    prefix, env, checkpoint, features, tmp = stream
    names = topics(prefix)
    moments = committed(kafka_bootstrap, names.moments, expected=MomentCode)
    if not moments:  # the encoder test did not run first: make the moments now
        encoder = spawn(["encoder", "--instance", "kill-enc2"], env, tmp / "encoder2.log")
        try:
            moments = committed(kafka_bootstrap, names.moments, lambda r: len(r) >= 300, expected=MomentCode)
        finally:
            stop(encoder)
    from pipeline.client import Client

    codes = np.stack([m.code for m in moments[::37]])  # queries near a spread of real moments
    client = Client(kafka_bootstrap, prefix)
    for i, code in enumerate(codes):
        client.add_query(code=code, query_id=f"q{i}", threshold=6)
    config = get_preset("lite")
    reference = LiveMatcher(moments[0].bits, moments[0].model, encode_text=None, moments_per_second=lambda second:
                            moments_ending_at(second, config.kernel_sizes, config.strides))
    reference.apply_queries([(q.query_id, q) for q in client.queries().values()])
    expected, _ = reference.process(moments)
    assert len(expected) >= len(codes)
    args = ["query-worker", "--instance", "kill-q", "--batch-records", "1"]
    ready = committed_at_least(kafka_bootstrap, names.matches, len(expected) // 2)
    restarted = kill_and_restart(args, env, tmp / "query.log", ready)
    try:
        events = committed(kafka_bootstrap, names.matches, lambda r: len(r) >= len(expected), expected=MatchEvent)
        time.sleep(3)
        events = committed(kafka_bootstrap, names.matches, expected=MatchEvent)
    finally:
        stop(restarted)
    key = lambda e: (e.query_id, e.stream_id, e.start, e.end, e.distance)  # noqa: E731
    assert Counter(map(key, events)) == Counter(map(key, expected))
