"""Secrets stay out of names and messages; the Kafka security settings reach every client. Unit tests, no broker."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

from pathlib import Path

import pytest

from pipeline import redact as redaction
from pipeline.bus.records import ErrorRecord, decode
from pipeline.bus.security import KafkaSettingsError, client_config, describe
from pipeline.logs import JsonFormatter
from pipeline.redact import keep_secret, redact

PASSWORD = "s3cret"
URL = f"rtsp://admin:{PASSWORD}@127.0.0.1:9/cam"


@pytest.fixture(autouse=True)
def no_config_file(monkeypatch, tmp_path):
    """Settings from the test's own vmh.toml and VMH_KAFKA_* only; secrets registered by one test stay in it."""
    for name in [n for n in os.environ if n.startswith("VMH_KAFKA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VMH_CONFIG", str(tmp_path / "vmh.toml"))
    monkeypatch.setattr(redaction, "_secrets", ())


@pytest.mark.parametrize("text, expected", [
    (URL, "rtsp://127.0.0.1:9/cam"),
    ("https://cdn.example/live/index.m3u8?token=abc&sig=1#t=3", "https://cdn.example/live/index.m3u8"),
    ("rtsp://user:p@ss@camera:554/stream", "rtsp://camera:554/stream"),  # an unencoded '@' in the password
    ("rtmp://key@ingest/app", "rtmp://ingest/app"),
    ("rtsp://u:p@[::1]:554/a?x=1", "rtsp://[::1]:554/a"),
    (f"[Errno 111] Connection refused: '{URL}'", "[Errno 111] Connection refused: 'rtsp://127.0.0.1:9/cam'"),
    ("two: http://a:b@h1/x?q and (https://h2/y?t=1)", "two: http://h1/x and (https://h2/y)"),
    ("/videos/lobby.mp4", "/videos/lobby.mp4"),
    ("device:0", "device:0"),
    ("rtsp://10.0.0.5/stream", "rtsp://10.0.0.5/stream"),
])
def test_redact_cuts_user_info_and_query_strings(text, expected):
    assert redact(text) == expected


def test_kept_secrets_are_masked_longest_first():
    keep_secret("hunter2")
    keep_secret("hunter2-and-more")
    keep_secret("")  # nothing to mask
    assert redact("a hunter2-and-more b hunter2 c") == "a *** b *** c"


def test_derived_stream_ids_carry_no_credentials():
    from workers.producer import stream_spec

    assert stream_spec(URL) == ("127.0.0.1-9-cam", URL)  # the source itself keeps them: it has to log in
    assert stream_spec("https://cdn.example/live.m3u8?token=abc")[0] == "cdn.example-live.m3u8"
    assert stream_spec(f"cam1={URL}") == ("cam1", URL)
    with pytest.raises(SystemExit) as exited:
        stream_spec("rtsp://admin:s3cret@/")
    assert PASSWORD not in str(exited.value)


def test_source_errors_and_default_stream_ids_are_redacted():
    from pipeline.video.source import SourceUnavailable, VideoSource

    def refuse(url, **_):
        raise ConnectionRefusedError(111, f"Connection refused: '{url}'")

    source = VideoSource(URL, opener=refuse)
    assert source.stream_id == "rtsp://127.0.0.1:9/cam"
    with pytest.raises(SourceUnavailable) as raised:
        next(iter(source))
    assert PASSWORD not in str(raised.value) and "admin" not in str(raised.value)
    assert "rtsp://127.0.0.1:9/cam" in str(raised.value)


def test_error_records_are_redacted_where_they_are_published():
    from workers.common import error_outgoing

    error = ErrorRecord(source=URL, kind="dead_source", message=f"stream x: {ValueError(URL)}", time=1.0)
    published = decode(error_outgoing("vmh.errors", error).value, ErrorRecord)
    assert (published.source, published.message) == ("rtsp://127.0.0.1:9/cam", "stream x: rtsp://127.0.0.1:9/cam")


def test_error_counts_are_labelled_by_kind_and_stream_counters_by_redacted_id():
    from prometheus_client import generate_latest

    from workers import metrics
    from workers.common import error_outgoing
    from workers.producer import stream_spec

    stream_id, _ = stream_spec(URL)
    metrics.FRAMES_DECODED.labels(stream_id).inc()
    error_outgoing("vmh.errors", ErrorRecord(source=URL, kind="dead_source", message=URL, time=1.0))
    exposed = generate_latest().decode()
    assert 'vmh_frames_decoded_total{stream="127.0.0.1-9-cam"}' in exposed
    assert PASSWORD not in exposed and "admin" not in exposed


def test_log_lines_are_redacted_in_message_fields_and_traceback():
    keep_secret("kafka-pw")
    logger = logging.getLogger("test.redaction")
    try:
        raise OSError(f"cannot open {URL}")
    except OSError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "stream %s failed; config %s",
                                   (URL, {"sasl_plain_password": "kafka-pw"}), sys.exc_info(),
                                   extra={"fields": {"source": URL, "n": 3}})
    line = JsonFormatter().format(record)
    assert PASSWORD not in line and "kafka-pw" not in line and "admin" not in line
    parsed = json.loads(line)
    assert parsed["source"] == "rtsp://127.0.0.1:9/cam" and parsed["n"] == 3
    assert "'sasl_plain_password': '***'" in parsed["msg"] and "rtsp://127.0.0.1:9/cam" in parsed["exc"]


def test_kafka_settings_from_the_kafka_table_and_the_environment(tmp_path, monkeypatch):
    (tmp_path / "ca.pem").write_text("not checked here")
    (tmp_path / "vmh.toml").write_text(f"""
bootstrap_servers = "kafka.example:9093"
[kafka]
security_protocol = "sasl_ssl"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "alice"
sasl_password = "from-file"
ssl_cafile = "{tmp_path / 'ca.pem'}"
client_id = "vmh-test"
""")
    monkeypatch.setenv("VMH_KAFKA_SASL_PASSWORD", "from-env")  # environment > file
    assert client_config() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "alice",
        "sasl_plain_password": "from-env", "ssl_cafile": str(tmp_path / "ca.pem"), "client_id": "vmh-test",
    }
    assert redact("password from-env") == "password ***"  # reading the settings registered the secret
    assert describe(client_config()) == "SASL_SSL, SCRAM-SHA-512 as alice"


def test_plaintext_is_the_default():
    assert client_config() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("env, message", [
    ({"VMH_KAFKA_SECURITY_PROTOCOL": "TLS"}, r"\[kafka\] security_protocol \(VMH_KAFKA_SECURITY_PROTOCOL\) is 'TLS'"),
    ({"VMH_KAFKA_SASL_USERNAME": "alice"}, r"sasl_username .* set, but .* PLAINTEXT: use SASL_PLAINTEXT or SASL_SSL"),
    ({"VMH_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, r"needs \[kafka\] sasl_mechanism"),
    ({"VMH_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "VMH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
      "VMH_KAFKA_SASL_USERNAME": "alice"}, r"needs \[kafka\] sasl_password \(VMH_KAFKA_SASL_PASSWORD\)"),
    ({"VMH_KAFKA_SSL_CAFILE": "/etc/ca.pem"}, r"ssl_cafile .* set, but .* is PLAINTEXT: use SSL or SASL_SSL"),
    ({"VMH_KAFKA_SECURITY_PROTOCOL": "SSL", "VMH_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
     r"ssl_cafile \(VMH_KAFKA_SSL_CAFILE\): no such file /nonexistent/ca.pem"),
])
def test_contradicting_kafka_settings_are_named(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KafkaSettingsError, match=message):
        client_config()


class _Recorder:
    """Stands in for a kafka-python client class: records its keyword arguments, does nothing else."""

    made: list[tuple[str, dict]] = []

    def __init__(self, *topics, **config) -> None:
        self.made.append((type(self).__name__, config))

    def __getattr__(self, name):
        return lambda *args, **kwargs: {1} if name == "partitions_for_topic" else None


def test_every_bus_client_gets_the_security_settings(monkeypatch):
    """The factories of pipeline/bus/kafka.py are the only way the workers, the client API, topic creation, the
    benchmarks and the tests make Kafka clients (a grep over the sources checks that)."""
    import pipeline.bus.kafka as bus

    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(bus, name, type(name, (_Recorder,), {}))
    monkeypatch.setattr(_Recorder, "made", [])
    settings = {"SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SASL_MECHANISM": "SCRAM-SHA-256", "SASL_USERNAME": "alice",
                "SASL_PASSWORD": "pw", "CLIENT_ID": "vmh-x"}
    for name, value in settings.items():
        monkeypatch.setenv(f"VMH_KAFKA_{name}", value)

    bus.admin_client("b:1")
    bus.at_least_once_producer("b:1")
    bus.read_committed_consumer(["t"], bootstrap="b:1")
    bus.read_committed_consumer(["t"], group_id="g", bootstrap="b:1")
    bus._partition_reader(bus.TopicPartition("t", 0), "b:1")
    bus.ExactlyOnceProcessor(["t"], "g", "g-0", lambda batch: [], bootstrap="b:1")
    made = _Recorder.made
    assert [kind for kind, _ in made] == ["KafkaAdminClient", "KafkaProducer", "KafkaConsumer", "KafkaConsumer",
                                          "KafkaConsumer", "KafkaProducer", "KafkaConsumer"]
    for _, config in made:
        assert config["bootstrap_servers"] == "b:1"
        assert {k: config.get(k) for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                           "sasl_plain_password", "client_id")} == {
            "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "alice",
            "sasl_plain_password": "pw", "client_id": "vmh-x"}


def test_no_kafka_client_is_made_outside_the_bus_factories():
    """A client built directly from kafka-python would miss the security settings."""
    root = Path(__file__).resolve().parents[1]
    direct = re.compile(r"\bKafka(Producer|Consumer|AdminClient)\(")
    allowed = {root / "pipeline" / "bus" / "kafka.py", root / "pipeline" / "bus" / "broker.py"}
    offenders = [f"{path.relative_to(root)}:{n}" for folder in ("pipeline", "workers", "tests")
                 for path in (root / folder).rglob("*.py") if path not in allowed
                 for n, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert offenders == []
