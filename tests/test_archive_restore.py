"""Integration: a query worker restores a partition of a million moments from the real broker.

The group has committed offsets past every moment (as after a restart), so the worker's archive is the restore:
it reads the partition chunk by chunk, logs its progress, and answers searches over all of the moments, the oldest
and the newest, with and without a time range.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from harness import lite_checkpoint, spawn, stop, worker_env
from pipeline.bus.records import MOMENT_FIELDS, PREFIX, MomentCode, decode, encode
from pipeline.bus.topics import create_topics, topics

pytestmark = pytest.mark.integration
MOMENTS, STREAMS, T0 = 1_000_000, 16, 1.7e9
FIXTURES = Path(__file__).parent / "fixtures"


def moment_values(n: int, rng) -> np.ndarray:
    """Encoded moment records [n, bytes] of 16 streams, 12 a second, made from one record's bytes (each field at
    its place), with random codes."""
    template = np.frombuffer(encode(MomentCode("cam-00", 0, 1, np.zeros(16, np.uint8), 128, 0.0, 0.0,
                                               session="x")), np.uint8)
    rows = np.tile(template, (n, 1))
    fields, i = PREFIX.size + 6, np.arange(n)
    rows[:, PREFIX.size + 4] = ord("0") + (i % STREAMS) // 10
    rows[:, PREFIX.size + 5] = ord("0") + (i % STREAMS) % 10
    second = i // (12 * STREAMS)
    rows[:, fields:fields + 16] = np.stack([second, second + 1 + i % 12], axis=1).astype("<i8").view(np.uint8)
    rows[:, fields + 16:fields + 32] = np.repeat(T0 + second, 2).reshape(-1, 2).astype("<f8").view(np.uint8)
    rows[:, -16:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    assert rows.shape[1] == PREFIX.size + 6 + MOMENT_FIELDS.size + 1 + 16
    return rows


def produce(bootstrap: str, topic: str, values: np.ndarray, directory) -> None:
    """``values`` to partition 0 of ``topic`` with Kafka's Java producer (a million records in seconds), keyed
    "cam", connecting with the configured Kafka security settings."""
    from pipeline.bus.broker import find_java, kafka_libs
    from pipeline.bus.security import client_config

    config = client_config()
    if any(k in config for k in ("ssl_certfile", "ssl_keyfile")):
        pytest.skip("the Java producer of this test is not given client certificates")
    lines = [f"bootstrap.servers={bootstrap}", f"security.protocol={config['security_protocol']}"]
    if "sasl_mechanism" in config:
        module = "plain.PlainLoginModule" if config["sasl_mechanism"] == "PLAIN" else "scram.ScramLoginModule"
        lines += [f"sasl.mechanism={config['sasl_mechanism']}",
                  f"sasl.jaas.config=org.apache.kafka.common.security.{module} required "
                  f"username={json.dumps(config['sasl_plain_username'])} "
                  f"password={json.dumps(config['sasl_plain_password'])};"]
    if "ssl_cafile" in config:
        lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={config['ssl_cafile']}"]
    (directory / "producer.properties").write_text("\n".join(line.replace("\\", "\\\\") for line in lines))
    key = np.frombuffer(b"cam", np.uint8)
    records = np.concatenate([np.tile(key, (len(values), 1)), values], axis=1)
    header = np.array([len(values), len(key), values.shape[1]], ">i4").tobytes()
    (directory / "records.bin").write_bytes(header + records.tobytes())
    subprocess.run([find_java(), "-cp", f"{kafka_libs()}/*", str(FIXTURES / "ProduceRecords.java"),
                    str(directory / "producer.properties"), topic, "0", str(directory / "records.bin")],
                   check=True, timeout=120)


def test_a_query_worker_restores_a_million_moments_and_searches_them(kafka_bootstrap, tmp_path):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from pipeline.bus.kafka import connect
    from pipeline.client import Client

    prefix = f"restore-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=1)
    names = topics(prefix)
    values = moment_values(MOMENTS, np.random.default_rng(0))
    assert decode(values[-1].tobytes(), MomentCode).stream_id == f"cam-{(MOMENTS - 1) % STREAMS:02d}"
    oldest, middle, newest = bytes(16), bytes([255] * 16), bytes([0x0F] * 16)  # far from random codes
    for offset, code in ((0, oldest), (MOMENTS // 2, middle), (MOMENTS - 1, newest)):
        values[offset, -16:] = np.frombuffer(code, np.uint8)
    produce(kafka_bootstrap, names.moments, values, tmp_path)
    group = f"{prefix}-query"  # the worker's: it resumes past every moment, as after a restart
    committer = connect(KafkaConsumer, kafka_bootstrap, group_id=group, enable_auto_commit=False)
    committer.assign([TopicPartition(names.moments, 0)])
    committer.commit({TopicPartition(names.moments, 0): OffsetAndMetadata(MOMENTS, "", -1)})
    committer.close()

    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(lite_checkpoint(tmp_path / "lite")))
    log = tmp_path / "worker.log"
    worker = spawn(["query-worker", "--instance", "a"], env, log)
    client = Client(kafka_bootstrap, prefix)
    try:
        deadline = time.monotonic() + 240
        while not _restored(log):
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no restore within 240 s"
            time.sleep(1)
        for code, offset in ((oldest, 0), (middle, MOMENTS // 2), (newest, MOMENTS - 1)):
            (hit,) = client.search(code=code, top_k=1, timeout=30)
            second = offset // (12 * STREAMS)
            assert (hit["distance"], hit["stream_id"], hit["start"], hit["capture_time"]) == (
                0, f"cam-{offset % STREAMS:02d}", second, T0 + second)
        # a time range leaves the planted middle moment out: the best is another, farther code
        late = client.search(code=middle, since=T0 + MOMENTS // (24 * STREAMS) + 1, top_k=3, timeout=30)
        assert len(late) == 3 and all(h["distance"] > 0 for h in late)
    finally:
        stop(worker)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    progress = [line for line in lines if line["msg"] == "restoring partition" and "percent" in line]
    (restored,) = [line for line in lines if line["msg"] == "partition restored"]
    assert progress and restored["moments"] == MOMENTS, log.read_text()[-3000:]


def _restored(log) -> bool:
    return log.exists() and '"partition restored"' in log.read_text()


def test_read_chunks_gives_a_range_a_chunk_at_a_time(kafka_bootstrap, topic_factory):
    from pipeline.bus.kafka import at_least_once_producer, read_chunks, read_range

    topic = topic_factory(partitions=1)
    producer = at_least_once_producer(kafka_bootstrap)
    for i in range(2500):
        producer.send(topic, value=str(i).encode(), partition=0)
    producer.flush()
    producer.close()
    chunks = list(read_chunks(topic, 0, 100, 2400, bootstrap=kafka_bootstrap, chunk=1000))
    assert [r.offset for chunk in chunks for r in chunk] == list(range(100, 2400))
    assert len(chunks) >= 2 and all(len(chunk) < 1000 + 500 for chunk in chunks[:-1])  # a poll adds <= 500
    assert [r.value for r in read_range(topic, 0, 2490, 9999, bootstrap=kafka_bootstrap)] == [
        str(i).encode() for i in range(2490, 2500)]
