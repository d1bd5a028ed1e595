"""`bus`: feature records per second into the real Kafka broker, our encoding and producer against kafka-python's.

Ours encodes each ``FrameFeatures`` (1280-d float16, about 2.6 kB) with ``records.encode`` and sends it keyed by
stream id with ``at_least_once_producer`` (idempotent, acks=all, linger_ms=5), as the producer worker does. The
reference sends ready-made payloads of the same size with the same keys from a ``KafkaProducer`` with
kafka-python 3.0's defaults: acks=all (-1) and enable_idempotence=True as well, linger_ms=0, batch_size=16384, no
compression. Each call sends ``records`` records and flushes. After every call each topic must hold exactly the
records sent to it so far, and a record read back from ours must decode to what was sent.

The broker is ``--bootstrap-servers`` (VMH_BOOTSTRAP_SERVERS) when set, else one started for the benchmark on a
free loopback port with a temporary data dir, and stopped at the end.
"""

from __future__ import annotations

import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field

from workers.bench.runner import Case, Verdict

NAME = "bus"
TITLE = "feature records per second into Kafka: records.encode + at_least_once_producer against raw kafka-python"
REFERENCE = ("kafka-python KafkaProducer with default settings (3.0.12: acks=all, idempotent, linger_ms=0, "
             "batch_size=16384) sending raw payloads of the same size and keys")
UNIT = "records/s"
TARGET = 0.9
REPEATS = 9
WARMUP = 1


@dataclass(frozen=True)
class Params:
    records: int = field(default=10_000, metadata={"help": "records sent (and flushed) per call"})
    dim: int = field(default=1280, metadata={"help": "feature width"})
    streams: int = field(default=64, metadata={"help": "distinct stream ids (record keys)"})
    partitions: int = field(default=4, metadata={"help": "partitions of each benchmark topic"})
    bootstrap_servers: str = field(default="", metadata={"help": "Kafka to use; empty: the bootstrap-servers "
                                                                 "setting, else a broker started for the benchmark"})


def broker(params: Params, stack: ExitStack) -> str:
    from pipeline.bus.broker import ensure_broker, free_port_pair, stop_broker
    from pipeline.settings import resolve

    given = params.bootstrap_servers or resolve("bootstrap-servers")
    if given:
        return given
    port = free_port_pair()
    data = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmh-bench-kafka-"))
    bootstrap = ensure_broker(port, data_dir=data)
    stack.callback(stop_broker, port)
    return bootstrap


def cases(params: Params, stack: ExitStack) -> list[Case]:
    import numpy as np
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.record.util import crc32c_c

    from pipeline.bus.kafka import admin_client, at_least_once_producer, connect, read_range
    from pipeline.bus.records import FrameFeatures, decode, encode, record_key

    bootstrap = broker(params, stack)
    run = uuid.uuid4().hex[:8]
    topics = {"ours": f"bench.bus.ours.{run}", "reference": f"bench.bus.reference.{run}"}
    admin = admin_client(bootstrap)
    stack.callback(admin.close)
    admin.create_topics({t: {"num_partitions": params.partitions, "replication_factor": -1} for t in topics.values()})
    admin.wait_for_topics(list(topics.values()))
    stack.callback(admin.delete_topics, list(topics.values()), raise_errors=False)

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((params.streams, params.dim)).astype(np.float16)
    records = [FrameFeatures(f"stream-{i % params.streams}", i // params.streams, i // params.streams + 0.5,
                             1.7e9 + i, vectors[i % params.streams]) for i in range(params.records)]
    keys = [record_key(r) for r in records]
    payload = rng.bytes(len(encode(records[0])))

    producer = at_least_once_producer(bootstrap)
    stack.callback(producer.close)
    raw = connect(KafkaProducer, bootstrap)  # kafka-python's defaults, with the cluster's security settings
    stack.callback(raw.close)
    consumer = connect(KafkaConsumer, bootstrap, enable_auto_commit=False)
    stack.callback(consumer.close)
    partitions = {side: [TopicPartition(t, p) for p in range(params.partitions)] for side, t in topics.items()}
    sent = {"ours": 0, "reference": 0}

    def ours() -> int:
        for record in records:
            producer.send(topics["ours"], value=encode(record), key=record_key(record))
        producer.flush()
        return len(records)

    def reference() -> int:
        for key in keys:
            raw.send(topics["reference"], value=payload, key=key)
        raw.flush()
        return len(keys)

    def check(mine: int, theirs: int) -> Verdict:
        sent["ours"] += mine
        sent["reference"] += theirs
        problems = []
        for side, tps in partitions.items():
            held = sum(consumer.end_offsets(tps).values())
            if held != sent[side]:
                problems.append(f"topic {topics[side]} holds {held} records, {sent[side]} were sent to it")
        first = read_range(topics["ours"], partitions["ours"][0].partition, 0, 1, bootstrap=bootstrap)
        if first:
            record = decode(first[0].value)
            if record not in records[record.t * params.streams:(record.t + 1) * params.streams]:
                problems.append(f"a record read back from {topics['ours']} is not one that was sent")
        return Verdict(problems, {"records sent": mine + theirs})

    return [Case(
        label=f"{params.dim}-d float16",
        ours=ours,
        reference=reference,
        work=params.records,
        check=check,
        amounts=lambda out: {"MB": out * len(payload) / 1e6},
        notes={"record_bytes": len(payload), "bootstrap": bootstrap, "partitions": params.partitions,
               # kafka-python checksums every record batch, in pure Python unless the crc32c package is installed
               "crc32c": "pure Python" if crc32c_c is None else "C (crc32c package)"},
    )]
