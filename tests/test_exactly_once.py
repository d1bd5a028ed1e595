"""Exactly-once consume-transform-produce against a real broker: kill -9, transform failures, partition moves.

The toy transform is stateful like the encoder: it numbers each key's records (b"rec-007" -> b"REC-007#3" for the
key's third record) and rebuilds its counts from the input log when partitions are assigned. Its uninterrupted
output is known in closed form, so any lost, duplicated or mis-counted record shows up as a difference.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import MemberToRemove, NewPartitions

from pipeline.bus.kafka import (
    ExactlyOnceProcessor, Outgoing, admin_client, at_least_once_producer, connect, read_committed_consumer, read_range,
)

# heartbeats every 0.3 s so rebalances settle fast; 6 s is the broker's default minimum session, for any cluster
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 300}


class RunningCount:
    """Per key, number the records seen so far. State lives per partition and is rebuilt from the input log."""

    def __init__(self, bootstrap: str, out_topic: str, fail_once_after: int | None = None,
                 block_after: int | None = None, blocked=None) -> None:
        self.bootstrap, self.out_topic = bootstrap, out_topic
        self.counts: dict[TopicPartition, Counter] = {}
        self.assigned: list[dict[TopicPartition, int]] = []
        self.revoked: list[set[TopicPartition]] = []
        self.seen = 0
        self.fail_once_after, self.block_after, self.blocked = fail_once_after, block_after, blocked

    def on_assign(self, positions: dict[TopicPartition, int]) -> None:
        self.assigned.append(positions)
        for tp, next_offset in positions.items():
            history = read_range(tp.topic, tp.partition, 0, next_offset, bootstrap=self.bootstrap)
            self.counts[tp] = Counter(r.key for r in history)

    def on_revoke(self, partitions: set[TopicPartition]) -> None:
        self.revoked.append(partitions)
        for tp in partitions:
            del self.counts[tp]

    def transform(self, records):
        for i, r in enumerate(records):
            counts = self.counts[TopicPartition(r.topic, r.partition)]
            counts[r.key] += 1
            self.seen += 1
            if self.fail_once_after is not None and self.seen > self.fail_once_after and i > 0:
                self.fail_once_after = None
                raise RuntimeError("transform failed half-way through a batch")
            yield Outgoing(self.out_topic, r.value.upper() + b"#%d" % counts[r.key], key=r.key)
        if self.block_after is not None and self.seen >= self.block_after:
            self.blocked.set()  # this batch's outputs are sent but not committed: the parent kills us now
            time.sleep(600)


def _counter_worker(bootstrap, in_topic, out_topic, group, instance, block_after, blocked, stop) -> None:
    """A worker process: the processor with the RunningCount transform, until ``stop`` is set or it is killed."""
    counter = RunningCount(bootstrap, out_topic, block_after=block_after, blocked=blocked)
    processor = ExactlyOnceProcessor(
        [in_topic], group, instance, counter.transform, on_assign=counter.on_assign, on_revoke=counter.on_revoke,
        bootstrap=bootstrap, max_poll_records=10, consumer_config=FAST_GROUP,
    )
    processor.run(stop, poll_timeout_ms=200)


def _produce_input(bootstrap: str, topic: str, n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    sent = [(b"stream-%d" % (i % 12), b"rec-%04d" % i) for i in range(start, start + n)]
    producer = at_least_once_producer(bootstrap)
    for key, value in sent:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    return sent


def _expected(sent: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out, counts = defaultdict(list), Counter()
    for key, value in sent:
        counts[key] += 1
        out[key].append(value.upper() + b"#%d" % counts[key])
    return dict(out)


def _committed_output(bootstrap: str, topic: str) -> dict[bytes, list[bytes]]:
    """Every committed record of ``topic``, per key in offset order (keys never span partitions)."""
    out = defaultdict(list)
    for p in range(4):
        for r in read_range(topic, p, 0, 1 << 62, bootstrap=bootstrap):
            out[r.key].append(r.value)
    return dict(out)


def _end_offsets(bootstrap: str, topic: str, isolation_level: str) -> dict[TopicPartition, int]:
    consumer = connect(KafkaConsumer, bootstrap, isolation_level=isolation_level)
    try:
        return consumer.end_offsets([TopicPartition(topic, p) for p in range(4)])
    finally:
        consumer.close()


def _reap(process, timeout_s: float) -> None:
    """Join a worker process; kill it if it is still there, so a failing test never leaves one behind."""
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _group_done(bootstrap: str, group: str, topic: str) -> bool:
    """True once the group's committed offsets reach the end of every input partition."""
    with admin_client(bootstrap) as admin:
        committed = admin.list_group_offsets({group: None}).get(group, {})
    ends = _end_offsets(bootstrap, topic, "read_committed")
    return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())


def test_kill_9_mid_transaction_then_restart_gives_exactly_once_output(kafka_bootstrap, topic_factory):
    in_topic, out_topic = topic_factory(), topic_factory()
    sent = _produce_input(kafka_bootstrap, in_topic, 160)
    group, instance = f"g-{uuid.uuid4().hex[:8]}", f"counter-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    blocked, stop = ctx.Event(), ctx.Event()

    first = ctx.Process(target=_counter_worker,
                        args=(kafka_bootstrap, in_topic, out_topic, group, instance, 60, blocked, stop))
    first.start()
    try:
        assert blocked.wait(60), "the first worker never reached its kill point"

        def open_transaction_on_broker() -> bool:
            high = _end_offsets(kafka_bootstrap, out_topic, "read_uncommitted")
            stable = _end_offsets(kafka_bootstrap, out_topic, "read_committed")
            return sum(high.values()) > sum(stable.values())

        _wait_until(open_transaction_on_broker, 20, "the open transaction's records to reach the broker")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        _reap(first, 10)
    assert first.exitcode == -signal.SIGKILL
    # what the dead worker committed is consistent: its group offsets cover exactly the outputs it committed
    with admin_client(kafka_bootstrap) as admin:
        offsets = admin.list_group_offsets({group: None})[group]
    committed_outputs = sum(map(len, _committed_output(kafka_bootstrap, out_topic).values()))
    assert 0 < committed_outputs == sum(o.offset for o in offsets.values())

    second = ctx.Process(target=_counter_worker,
                         args=(kafka_bootstrap, in_topic, out_topic, group, instance, None, blocked, stop))
    second.start()
    try:
        _wait_until(lambda: _group_done(kafka_bootstrap, group, in_topic), 60, "the restarted worker to finish")
    finally:
        stop.set()
        _reap(second, 30)
    assert second.exitcode == 0

    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)
    # the killed worker's outputs are still in the log, aborted: read_uncommitted sees more than was committed
    everything = connect(KafkaConsumer, kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=2000,
                         isolation_level="read_uncommitted")
    everything.assign([TopicPartition(out_topic, p) for p in range(4)])
    assert sum(1 for _ in everything) > len(sent)
    everything.close()


def test_aborted_transactions_are_invisible_to_read_committed(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=1)
    producer = connect(KafkaProducer, kafka_bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:8]}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(5):
        producer.send(topic, value=b"aborted-%d" % i)
    producer.flush()
    producer.abort_transaction()
    producer.begin_transaction()
    for i in range(3):
        producer.send(topic, value=b"committed-%d" % i)
    producer.commit_transaction()
    producer.close()

    committed = [b"committed-%d" % i for i in range(3)]
    assert [r.value for r in read_range(topic, 0, 0, 100, bootstrap=kafka_bootstrap)] == committed
    consumer = read_committed_consumer([topic], bootstrap=kafka_bootstrap)
    seen = [r.value for batch in consumer.poll(timeout_ms=3000).values() for r in batch]
    consumer.close()
    assert seen == committed
    # read_uncommitted sees the aborted records too: they are in the log, only hidden (polled until all 8 are in,
    # with a deadline rather than an idle timeout, which a loaded machine outwaits)
    raw = connect(KafkaConsumer, kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    raw.assign([TopicPartition(topic, 0)])
    values, deadline = [], time.monotonic() + 30
    while len(values) < 8 and time.monotonic() < deadline:
        values += [r.value for batch in raw.poll(timeout_ms=500).values() for r in batch]
    raw.close()
    assert sorted(values) == sorted([b"aborted-%d" % i for i in range(5)] + committed)


def _drain(processor: ExactlyOnceProcessor, total: int, timeout_s: float = 60) -> int:
    consumed, failures = 0, 0
    deadline = time.monotonic() + timeout_s
    while consumed < total:
        assert time.monotonic() < deadline, f"consumed {consumed} of {total}"
        try:
            consumed += processor.process_once(200)
        except RuntimeError:
            failures += 1
    return failures


def test_failed_transform_aborts_rewinds_and_rebuilds_state(kafka_bootstrap, topic_factory):
    in_topic, out_topic = topic_factory(), topic_factory()
    sent = _produce_input(kafka_bootstrap, in_topic, 80)
    counter = RunningCount(kafka_bootstrap, out_topic, fail_once_after=30)
    with ExactlyOnceProcessor([in_topic], f"g-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}", counter.transform,
                              on_assign=counter.on_assign, on_revoke=counter.on_revoke, bootstrap=kafka_bootstrap,
                              max_poll_records=10, consumer_config=FAST_GROUP) as processor:
        first, deadline = 0, time.monotonic() + 60
        while not first and time.monotonic() < deadline:
            first = processor.process_once(200)
        # lag counts from the high watermarks of the partitions fetched so far
        assert 0 < sum(processor.lag().values()) <= len(sent) - first
        assert _drain(processor, len(sent) - first) == 1
        assert set(processor.lag().values()) == {0}
    assert len(counter.revoked) == 1 and len(counter.assigned) == 2
    assert counter.revoked[0] == set(counter.assigned[1])
    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)


def test_failed_state_rebuild_skips_no_records(kafka_bootstrap, topic_factory):
    in_topic, out_topic = topic_factory(), topic_factory()
    sent = _produce_input(kafka_bootstrap, in_topic, 80)
    counter = RunningCount(kafka_bootstrap, out_topic, fail_once_after=30)
    calls = []

    def flaky_on_assign(positions):
        calls.append(positions)
        if len(calls) == 2:  # the re-announcement after the failed transform: its partition's records are polled
            raise RuntimeError("state rebuild failed")
        counter.on_assign(positions)

    with ExactlyOnceProcessor([in_topic], f"g-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}", counter.transform,
                              on_assign=flaky_on_assign, on_revoke=counter.on_revoke, bootstrap=kafka_bootstrap,
                              max_poll_records=10, consumer_config=FAST_GROUP) as processor:
        assert _drain(processor, len(sent)) == 2
    assert len(calls) == 3 and calls[1] == calls[2]
    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)


def test_partitions_move_to_a_new_member_with_state_rebuilt(kafka_bootstrap, topic_factory):
    in_topic, out_topic = topic_factory(), topic_factory()
    group = f"g-{uuid.uuid4().hex[:8]}"
    sent = _produce_input(kafka_bootstrap, in_topic, 80)
    counters, stop, threads = [], threading.Event(), []

    def start_member(name: str) -> None:
        counter = RunningCount(kafka_bootstrap, out_topic)
        processor = ExactlyOnceProcessor([in_topic], group, name, counter.transform, on_assign=counter.on_assign,
                                         on_revoke=counter.on_revoke, bootstrap=kafka_bootstrap, max_poll_records=10,
                                         consumer_config=FAST_GROUP)
        counters.append(counter)
        threads.append(threading.Thread(target=processor.run, args=(stop, 200)))
        threads[-1].start()

    try:
        start_member(f"a-{uuid.uuid4().hex[:8]}")
        _wait_until(lambda: _group_done(kafka_bootstrap, group, in_topic), 60, "the first member to catch up")
        start_member(f"b-{uuid.uuid4().hex[:8]}")
        _wait_until(lambda: counters[1].counts and len(counters[0].counts) < 4, 60, "partitions to move")
        sent += _produce_input(kafka_bootstrap, in_topic, 80, start=80)
        _wait_until(lambda: _group_done(kafka_bootstrap, group, in_topic), 60, "both members to catch up")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    a, b = counters
    assert set(a.counts).isdisjoint(b.counts) and len(a.counts) + len(b.counts) == 4
    assert a.revoked and set().union(*a.revoked) == set(b.counts)
    assert all(offset > 0 for offset in b.assigned[0].values()), "the new member resumes where the first stopped"
    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)


def test_a_join_that_outlives_its_poll_is_finished_and_the_member_stays(kafka_bootstrap, topic_factory):
    """A metadata change makes the leader rejoin (every member's first join is followed by one, as its metadata
    fills in; here partitions are added). With polls shorter than that join's round trip, as on a loaded machine,
    kafka-python 3.0.12 lost the join and the member's heartbeats, and the broker dropped it at the session timeout
    (6 s here)."""
    in_topic, out_topic = topic_factory(), topic_factory()
    group, instance = f"g-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    counter = RunningCount(kafka_bootstrap, out_topic)
    fresh_metadata = {**FAST_GROUP, "metadata_max_age_ms": 500}  # see the new partitions within the test
    with ExactlyOnceProcessor([in_topic], group, instance, counter.transform, on_assign=counter.on_assign,
                              on_revoke=counter.on_revoke, bootstrap=kafka_bootstrap,
                              consumer_config=fresh_metadata) as processor, admin_client(kafka_bootstrap) as admin:
        _wait_until(lambda: processor.process_once(timeout_ms=200) == 0 and len(processor.assignment()) == 4, 60,
                    "the member to own the input's 4 partitions")
        admin.create_partitions({in_topic: NewPartitions(total_count=6)})
        deadline = time.monotonic() + 12  # the rejoin, then beyond the session: a member without heartbeats is gone
        while time.monotonic() < deadline:
            processor.process_once(timeout_ms=1)
        described = admin.describe_groups([group])[group]
        assert described["group_state"] == "Stable"
        assert [m["group_instance_id"] for m in described["members"]] == [instance]
        assert len(processor.assignment()) == 6
        sent = _produce_input(kafka_bootstrap, in_topic, 30)
        _drain(processor, len(sent))
    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)


def test_a_member_the_group_dropped_rejoins_at_its_next_commit(kafka_bootstrap, topic_factory, caplog):
    """A member the broker no longer knows (removed by an operator here; its session expired, in the field) has its
    next transaction refused, and rejoins then rather than at a heartbeat that may be 14 s away, or never come."""
    in_topic, out_topic = topic_factory(), topic_factory()
    group, instance = f"g-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    counter = RunningCount(kafka_bootstrap, out_topic)
    sent = _produce_input(kafka_bootstrap, in_topic, 20)
    with ExactlyOnceProcessor([in_topic], group, instance, counter.transform, on_assign=counter.on_assign,
                              on_revoke=counter.on_revoke, bootstrap=kafka_bootstrap,
                              consumer_config={"session_timeout_ms": 45_000, "heartbeat_interval_ms": 14_000}
                              ) as processor, admin_client(kafka_bootstrap) as admin:
        _drain(processor, len(sent))
        removed = admin.remove_group_members(group, [MemberToRemove(group_instance_id=instance)])
        assert [error.__name__ for error in removed.values()] == ["NoError"]
        sent += _produce_input(kafka_bootstrap, in_topic, 20, start=20)
        with caplog.at_level(logging.WARNING, logger="pipeline.bus.kafka"):
            _drain(processor, 20)
        assert [m["group_instance_id"] for m in admin.describe_groups([group])[group]["members"]] == [instance]
    refused = [r for r in caplog.records if "aborted and rewound" in r.getMessage()]
    assert len(refused) <= 1, [r.getMessage() for r in refused]
    assert _committed_output(kafka_bootstrap, out_topic) == _expected(sent)
