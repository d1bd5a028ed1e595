"""The local Apache Kafka broker and the plain (non-transactional) bus clients, against a real broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.bus.broker import BrokerError, broker_status, find_java, free_port_pair, kafka_libs
from pipeline.bus.kafka import admin_client, at_least_once_producer, read_committed_consumer, read_range
from pipeline.bus.topics import TOPIC_CONFIGS, create_topics, topics

ROOT = Path(__file__).resolve().parents[1]


def _poll_until(consumer, count: int, timeout_s: float = 20.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records += batch
    return records


def test_keyed_records_stay_ordered_on_one_partition(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=4)
    producer = at_least_once_producer(kafka_bootstrap)
    sent = [(f"stream-{i % 7}".encode(), f"{i}".encode()) for i in range(300)]
    for key, value in sent:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()

    consumer = read_committed_consumer([topic], group_id=f"g-{uuid.uuid4().hex[:8]}", bootstrap=kafka_bootstrap)
    records = _poll_until(consumer, len(sent))
    consumer.close()

    assert len(records) == len(sent)
    partitions, values = defaultdict(set), defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        partitions[r.key].add(r.partition)
        values[r.key].append(int(r.value))
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1, "7 keys should spread over several partitions"
    for key, got in values.items():
        assert got == [int(v) for k, v in sent if k == key]


def test_second_group_member_gets_partitions(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=4)
    everything = {TopicPartition(topic, p) for p in range(4)}
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = {"enable_auto_commit": False, "heartbeat_interval_ms": 300}
    first = read_committed_consumer([topic], group_id=group, bootstrap=kafka_bootstrap, **config)
    second = None
    try:
        deadline = time.monotonic() + 30
        while first.assignment() != everything and time.monotonic() < deadline:
            first.poll(timeout_ms=100)
        assert first.assignment() == everything

        second = read_committed_consumer([topic], group_id=group, bootstrap=kafka_bootstrap, **config)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            first.poll(timeout_ms=100)
            second.poll(timeout_ms=100)
            a, b = first.assignment(), second.assignment()
            if a and b and not a & b and a | b == everything:
                break
        assert a and b, f"one member has no partitions: {a}, {b}"
        assert not a & b and a | b == everything
    finally:
        first.close()
        if second is not None:
            second.close()


def test_read_range_returns_exactly_the_range(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=1)
    producer = at_least_once_producer(kafka_bootstrap)
    for i in range(50):
        producer.send(topic, value=str(i).encode())
    producer.flush()
    producer.close()
    assert [int(r.value) for r in read_range(topic, 0, 10, 20, bootstrap=kafka_bootstrap)] == list(range(10, 20))
    assert [r.offset for r in read_range(topic, 0, 45, 1000, bootstrap=kafka_bootstrap)] == list(range(45, 50))
    assert read_range(topic, 0, 50, 60, bootstrap=kafka_bootstrap) == []
    with pytest.raises(ValueError, match="bad offset range"):
        read_range(topic, 0, 5, 4, bootstrap=kafka_bootstrap)


def test_create_topics_is_idempotent_and_sets_configs(kafka_bootstrap):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = topics(prefix)
    created = create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    assert sorted(created) == sorted(names.all().values())
    assert create_topics(kafka_bootstrap, prefix=prefix, partitions=2) == []

    admin = admin_client(kafka_bootstrap)
    described = admin.describe_topics([names.queries])
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in (names.queries, names.features)]
    configs = admin.describe_configs(resources)["topic"]
    admin.delete_topics(list(names.all().values()))
    admin.close()
    assert len(described[0]["partitions"]) == 2
    assert configs[names.queries]["cleanup.policy"]["value"] == "compact"
    assert configs[names.queries]["min.compaction.lag.ms"]["value"] == TOPIC_CONFIGS["queries"]["min.compaction.lag.ms"]
    assert configs[names.features]["cleanup.policy"]["value"] == "delete"
    assert configs[names.features]["retention.ms"]["value"] == str(24 * 3600 * 1000)


def test_topic_names_follow_the_prefix():
    assert topics("abc").moments == "abc.moments"
    assert topics("abc").search_replies == "abc.search-replies"
    with pytest.raises(ValueError, match="topic prefix"):
        topics("bad prefix")
    with pytest.raises(KeyError, match="unknown topic kind"):
        topics("abc").name("frames")


def _vmh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", "broker", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_broker_command_start_status_stop(tmp_path, free_port):
    port = free_port
    common = ("--port", str(port), "--data-dir", str(tmp_path / "data"))
    started = _vmh("start", *common)
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        state = broker_status(port)
        assert state is not None and psutil.pid_exists(state.pid)
        assert (tmp_path / "data" / "broker.log").read_text().count("Kafka Server started") == 1

        again = _vmh("start", *common)
        assert again.returncode == 0 and "already running" in again.stdout
        status = _vmh("status", "--port", str(port))
        assert status.returncode == 0 and str(state.pid) in status.stdout
    finally:
        stopped = _vmh("stop", "--port", str(port))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not psutil.pid_exists(state.pid) or psutil.Process(state.pid).status() == psutil.STATUS_ZOMBIE
    assert broker_status(port) is None
    after = _vmh("status", "--port", str(port))
    assert after.returncode == 1 and "no broker" in after.stdout


def test_start_refuses_a_port_taken_by_something_else(tmp_path, free_port):
    port = free_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = _vmh("start", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is taken by another process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _fake_java(directory: Path, version_line: str) -> None:
    java = directory / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)


@pytest.mark.parametrize("line", ['openjdk version "11.0.2" 2019-01-15', 'java version "1.8.0_292"'])
def test_old_java_is_refused(tmp_path, monkeypatch, line):
    _fake_java(tmp_path, line)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"needs Java 17\+"):
        find_java()


def test_missing_java_and_maven_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="`java` is not on PATH"):
        find_java()
    with pytest.raises(BrokerError, match="`mvn` is not on PATH"):
        kafka_libs(str(tmp_path / "cache"), progress=False)


def test_a_cluster_id_that_begins_with_a_dash_formats(tmp_path):
    """One random id in 64 begins with '-', which kafka-storage took for an option when given as its own argument."""
    from pipeline.bus.broker import format_storage, new_cluster_id, server_properties

    cluster_id = "-" + new_cluster_id()[1:]
    props = tmp_path / "server.properties"
    props.write_text("".join(f"{k}={v}\n" for k, v in server_properties(free_port_pair(), tmp_path).items()))
    format_storage(find_java(), kafka_libs(progress=False), props, cluster_id)
    assert f"cluster.id={cluster_id}\n" in (tmp_path / "kraft" / "meta.properties").read_text()


def test_a_formatted_data_dir_refuses_another_scram_user(tmp_path):
    """The SCRAM user exists only in storage formatted with it, so a start with other credentials fails at once."""
    from pipeline.bus.broker import Scram, _check_formatted_for, _remember_user

    alice = Scram("SCRAM-SHA-256", "alice", "pw")
    _remember_user(alice, tmp_path)
    _check_formatted_for(alice, tmp_path)
    assert "pw" not in (tmp_path / "scram-user.json").read_text()
    for other in (Scram("SCRAM-SHA-256", "alice", "pw2"), Scram("SCRAM-SHA-512", "alice", "pw"),
                  Scram("SCRAM-SHA-256", "bob", "pw")):
        with pytest.raises(BrokerError, match="was formatted without the SCRAM user"):
            _check_formatted_for(other, tmp_path)
    _remember_user(None, tmp_path)
    with pytest.raises(BrokerError, match="was formatted without the SCRAM user alice"):
        _check_formatted_for(alice, tmp_path)
    with pytest.raises(BrokerError, match="SCRAM-SHA-256 or SCRAM-SHA-512, not PLAIN"):
        Scram("PLAIN", "alice", "pw")
    with pytest.raises(BrokerError, match="commas, quotes"):
        Scram("SCRAM-SHA-256", "a,b", "pw")


def test_the_local_broker_follows_the_kafka_settings(monkeypatch):
    from pipeline.bus.broker import Scram

    monkeypatch.setenv("VMH_CONFIG", "/nonexistent/vmh.toml")
    for name in [n for n in os.environ if n.startswith("VMH_KAFKA_")]:
        monkeypatch.delenv(name)
    assert Scram.from_settings() is None
    for name, value in {"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_MECHANISM": "scram-sha-512",
                        "SASL_USERNAME": "alice", "SASL_PASSWORD": "pw"}.items():
        monkeypatch.setenv(f"VMH_KAFKA_{name}", value)
    assert Scram.from_settings() == Scram("SCRAM-SHA-512", "alice", "pw")
    monkeypatch.setenv("VMH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(BrokerError, match="speaks PLAINTEXT or SASL_PLAINTEXT, but .* is SASL_SSL"):
        Scram.from_settings()


def test_server_properties_hold_any_password():
    """Kafka reads server.properties as ISO-8859-1 with backslash escapes, and JAAS options are quoted strings."""
    from pipeline.bus.broker import _jaas_quoted, _properties_escaped

    assert _properties_escaped("plain-ascii=ok") == "plain-ascii=ok"
    assert _properties_escaped("a\\bé😀") == "a\\\\b\\u00e9\\ud83d\\ude00"
    assert _jaas_quoted('say "hi" \\o/') == 'say \\"hi\\" \\\\o/'
