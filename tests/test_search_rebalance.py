"""Integration: the search archive follows the partitions of the moments topic through rebalances.

Two query workers share the partitions; a second joining, and the first killed and restarted, move partitions
between them. Every search meanwhile returns each archived moment at most once, and once replies cover every
partition, all of them.
"""

from __future__ import annotations

import signal
import time
import uuid

import numpy as np
import pytest

from harness import lite_checkpoint, spawn, stop, worker_env
from pipeline.bus.records import MomentCode, encode
from pipeline.bus.topics import create_topics, topics

pytestmark = pytest.mark.integration
STREAMS, SECONDS = 4, 30


def test_no_duplicate_hits_through_rebalances(kafka_bootstrap, tmp_path):
    from pipeline.bus.kafka import at_least_once_producer
    from pipeline.client import Client

    prefix = f"rebalance-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    names = topics(prefix)
    rng = np.random.default_rng(0)
    producer = at_least_once_producer(kafka_bootstrap)
    for t in range(SECONDS):
        for s in range(STREAMS):
            moment = MomentCode(f"s{s}", t, t + 1, rng.integers(0, 256, 16, dtype=np.uint8), 128, 1.7e9 + t,
                                1.7e9 + t, session="x")
            producer.send(names.moments, key=moment.stream_id.encode(), value=encode(moment))
    producer.flush()
    producer.close()
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(lite_checkpoint(tmp_path / "lite")))
    client = Client(kafka_bootstrap, prefix)
    everything = {(f"s{s}", t) for s in range(STREAMS) for t in range(SECONDS)}

    def search_until_complete(deadline_s=90.0):
        """Search until one result holds every moment; every result on the way holds each at most once."""
        deadline = time.monotonic() + deadline_s
        while True:
            hits = client.search(code=bytes(16), top_k=1000, timeout=5)
            found = [(h["stream_id"], h["start"]) for h in hits]
            assert len(found) == len(set(found)), "a moment came back twice"
            if set(found) == everything:
                return
            assert time.monotonic() < deadline, f"{len(set(found))} of {len(everything)} moments found"

    first = spawn(["query-worker", "--instance", "a"], env, tmp_path / "a.log")
    second = None
    try:
        search_until_complete()
        second = spawn(["query-worker", "--instance", "b"], env, tmp_path / "b.log")
        for _ in range(5):  # while the second joins and takes a partition
            search_until_complete()
            time.sleep(1)
        first.send_signal(signal.SIGKILL)  # static membership: restarted, it takes its partitions back at once
        first.wait()
        first = spawn(["query-worker", "--instance", "a"], env, tmp_path / "a.log")
        for _ in range(5):
            search_until_complete()
            time.sleep(1)
    finally:
        for worker in (first, second):
            if worker is not None:
                stop(worker)
