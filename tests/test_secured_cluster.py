"""Integration: the pipeline against a SASL/SCRAM listener of `vmh broker start`, credentials from a vmh.toml.

One module-wide run: the broker is started and stopped through the CLI (stopped by its data dir alone), producer,
encoder and query worker run as processes with nothing but ``VMH_CONFIG`` pointing at the vmh.toml, and two
clients try the same cluster without credentials and with a wrong password. The producer also pushes a
credentialed RTSP URL that refuses connections, so the run shows what becomes of a camera password: nothing on
any topic, in any log line or metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest

from harness import ROOT, committed, lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.broker import free_port_pair
from pipeline.bus.records import ErrorRecord, MatchEvent, MomentCode
from pipeline.bus.topics import topics
from pipeline.model import candidate_spans, get_preset

pytestmark = pytest.mark.integration

USER = "vmh-worker"
PASSWORD = 'pa,ss"wörd\\]x'  # a comma, a quote, a backslash, a bracket and non-ASCII: what kafka-storage,
# .properties files and JAAS treat specially
CAMERA = "rtsp://admin:s3cret@127.0.0.1:9/cam"
SECRETS = ("s3cret", "admin:", PASSWORD, "wrong-password")


def _vmh(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A SCRAM-SHA-512 broker from `vmh broker start`, and a vmh.toml for its clients (also active in-process)."""
    root = tmp_path_factory.mktemp("secured")
    config = root / "vmh.toml"
    config.write_text(f'[kafka]\nsecurity_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "SCRAM-SHA-512"\n'
                      f'sasl_username = "{USER}"\nsasl_password = {json.dumps(PASSWORD)}\nclient_id = "vmh-it"\n')
    port, data = free_port_pair(), root / "kafka"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMH_KAFKA_", "VMH_BOOTSTRAP_SERVERS"))}
    env["VMH_CONFIG"] = str(config)
    started = _vmh("broker", "start", "--port", str(port), "--data-dir", str(data), env=env)
    assert started.returncode == 0, started.stderr
    assert f"SASL_PLAINTEXT SCRAM-SHA-512 user {USER}" in started.stdout
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VMH_CONFIG", str(config))
            yield SimpleNamespace(bootstrap=f"127.0.0.1:{port}", config=config, env=env, root=root)
    finally:
        status = _vmh("broker", "status", "--data-dir", str(data), env=env)
        stopped = _vmh("broker", "stop", "--data-dir", str(data), env=env)  # not on the default port: found by D
    assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
    assert stopped.returncode == 0 and "stopped broker pid" in stopped.stdout and f"on port {port}" in stopped.stdout


@pytest.fixture(scope="module")
def run(cluster):
    """The whole pipeline once over SASL, with the clients that lack credentials trying alongside."""
    from pipeline.bus.topics import create_topics
    from pipeline.client import Client

    root, prefix = cluster.root, f"sasl-{uuid.uuid4().hex[:8]}"
    create_topics(cluster.bootstrap, prefix=prefix, partitions=2)
    checkpoint = lite_checkpoint(root / "lite")
    video = render_synthetic(root / "synthetic.mp4")
    env = worker_env(cluster.bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint), VMH_CONFIG=str(cluster.config))
    # 30 s of bootstrap attempts each, in parallel with the run
    outsiders = {
        "anonymous": spawn(["topics", "create"], {**env, "VMH_CONFIG": str(root / "none.toml")},
                           root / "anonymous.log"),
        "wrong": spawn(["topics", "create"], {**env, "VMH_KAFKA_SASL_PASSWORD": "wrong-password",
                                              "VMH_LOG_LEVEL": "DEBUG"}, root / "wrong.log"),
    }
    Client(cluster.bootstrap, prefix).add_query(code=bytes(16), query_id="everything", threshold=128)
    ports = {"producer": free_port_pair()}
    workers = {
        "encoder": spawn(["encoder", "--instance", "sasl-0"], env, root / "encoder.log"),
        "query": spawn(["query-worker", "--instance", "sasl-0"], env, root / "query.log"),
        "producer": spawn(["producer", f"synthetic={video}", CAMERA, "--realtime",
                           "--metrics-port", str(ports["producer"])], env, root / "producer.log"),
    }
    names = topics(prefix)
    try:
        errors = committed(cluster.bootstrap, names.errors, lambda r: any(e.kind == "dead_source" for e in r),
                           expected=ErrorRecord)
        metrics = _scrape(ports["producer"])  # while the paced file still plays
        assert workers["producer"].wait(120) == 0, (root / "producer.log").read_text()[-3000:]
        moments = committed(cluster.bootstrap, names.moments, lambda r: any(m.last for m in r), expected=MomentCode)
        matches = committed(cluster.bootstrap, names.matches, lambda r: len(r) > 0, expected=MatchEvent)
        for process in outsiders.values():
            process.wait(90)
    finally:
        for process in [*workers.values(), *outsiders.values()]:
            stop(process)
    return SimpleNamespace(errors=errors, moments=moments, matches=matches, metrics=metrics, names=names,
                           outsiders={k: (p.returncode, (root / f"{k}.log").read_text()) for k, p in outsiders.items()},
                           logs={k: (root / f"{k}.log").read_text() for k in ("encoder", "query", "producer")})


def _scrape(port: int, timeout: float = 60) -> str:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if 'vmh_video_seconds_total{stream="synthetic"}' in text and "dead_source" in text:
                return text
        except OSError:
            pass
        assert time.monotonic() < deadline, "the producer's metrics never showed both streams"
        time.sleep(0.5)


def test_the_pipeline_runs_over_sasl_with_credentials_from_vmh_toml(run):
    assert {m.stream_id for m in run.moments} == {"synthetic"}
    spans = [(m.start, m.end) for m in run.moments if not m.last]  # the last one repeats the final moment
    lite = get_preset("lite")
    assert sorted(spans) == sorted(map(tuple, candidate_spans(12, lite.kernel_sizes, lite.strides).tolist()))
    assert run.matches and all(e.query_id == "everything" and e.stream_id == "synthetic" for e in run.matches)


def test_clients_without_the_credentials_fail_and_say_why(run):
    code, log = run.outsiders["anonymous"]
    assert code != 0 and "cannot connect to Kafka at 127.0.0.1:" in log and "with PLAINTEXT" in log
    code, log = run.outsiders["wrong"]  # the broker hangs up on a failed SCRAM exchange
    assert code != 0 and f"with SASL_PLAINTEXT, SCRAM-SHA-512 as {USER}" in log
    assert "Starting KafkaAdminClient with configuration" in log  # kafka-python's DEBUG line, password masked
    assert "'sasl_plain_password': '***'" in log
    assert "wrong-password" not in log and PASSWORD not in log


def test_a_camera_password_leaves_no_trace_on_topics_logs_or_metrics(run, cluster):
    from kafka import KafkaConsumer, TopicPartition

    from pipeline.bus.kafka import connect

    camera = [e for e in run.errors if e.kind == "dead_source"]
    assert [(e.source, e.message.split(":")[0]) for e in camera] == [("127.0.0.1-9-cam", "stream 127.0.0.1-9-cam")]
    assert "rtsp://127.0.0.1:9/cam" in camera[0].message
    raw = connect(KafkaConsumer, cluster.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000,
                  isolation_level="read_uncommitted")
    raw.assign([TopicPartition(topic, p) for topic in run.names.all().values() for p in range(2)])
    everything = [(r.key or b"") + (r.value or b"") + b"".join(v for _, v in r.headers) for r in raw]
    raw.close()
    assert len(everything) > len(run.moments)
    texts = {"metrics": run.metrics, **run.logs}
    for secret in SECRETS:
        assert not any(secret.encode() in record for record in everything), secret
        assert not [name for name, text in texts.items() if secret in text], secret
    assert 'vmh_errors_total{kind="dead_source"} 1.0' in run.metrics
