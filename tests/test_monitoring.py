"""Monitoring: the dashboard and alert rules in deploy/monitoring name only metrics the running workers export,
and every worker's /healthz turns 503 when its loop stops completing polls."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import ROOT, render_synthetic, spawn, stop, worker_env, lite_checkpoint
from pipeline.bus.broker import free_port_pair

MONITORING = ROOT / "deploy" / "monitoring"
METRIC = re.compile(r"\bvmh_[a-z0-9_]+")
# named, and declared by every worker, but only sampled once it happens: a producer shedding load
UNPROVOKED = {"vmh_dropped_seconds_total"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def named_metrics() -> set[str]:
    """Every vmh_* series name the dashboard and alert rules query (``up`` and the like are Prometheus's own)."""
    return {name for expr in dashboard_expressions() + alert_expressions() for name in METRIC.findall(expr)}


def test_the_dashboard_and_rules_cover_what_the_issue_asked_for():
    names = named_metrics()
    for wanted in ("vmh_consumer_lag_records", "vmh_errors_total", "vmh_moments_total", "vmh_matches_total",
                   "vmh_stage_seconds_bucket", "vmh_end_to_end_seconds_bucket", "vmh_frames_decoded_total",
                   "vmh_loop_idle_seconds"):
        assert wanted in names
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    assert jobs == {"vmh-producer", "vmh-encoder", "vmh-query-worker"}
    assert all(re.search(r'job=~"vmh-\.\*"', e) for e in alert_expressions() if "up{" in e)


def scrape(port: int) -> tuple[set[str], set[str]]:
    """(metric families declared, sample names with values) of a worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    declared, sampled = set(), set()
    for family in text_string_to_metric_families(text):
        declared.add(family.name + ("_total" if family.type == "counter" else ""))
        declared.update({"histogram": {family.name + s for s in ("_bucket", "_count", "_sum")}}.get(family.type, ()))
        sampled.update(sample.name for sample in family.samples)
    return declared, sampled


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def listening(pid: int, port: int) -> set[str]:
    """The addresses process ``pid`` listens on at ``port``."""
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def compose_probe(service: str, port: int) -> int:
    """Exit code of the compose file's healthcheck of ``service``, run here against ``port``."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    command, python, flag, code = compose["services"][service]["healthcheck"]["test"]
    assert (command, python, flag) == ("CMD", "python", "-c")
    return subprocess.run([sys.executable, "-c", code.replace(":9100/", f":{port}/")], capture_output=True,
                          timeout=30).returncode


def wait_for(check, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := check():
                return result
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{what} not met within {timeout:.0f} s"
        time.sleep(0.5)


@pytest.mark.integration
def test_every_metric_the_dashboard_and_alerts_name_is_exported_by_the_running_workers(kafka_bootstrap, tmp_path):
    from pipeline.bus.topics import create_topics
    from pipeline.client import Client

    prefix = f"mon-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    checkpoint = lite_checkpoint(tmp_path / "lite")
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(checkpoint))
    first, second = free_port_pair(), free_port_pair()
    ports = {"producer": first, "encoder": first + 1, "query-worker": second}
    Client(kafka_bootstrap, prefix).add_query(code=bytes(16), query_id="anything", threshold=128)  # matches all
    video = render_synthetic(tmp_path / "synthetic.mp4", duration=8.0)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    workers = {
        # a corrupt file beside the live stream, so an error of some kind is counted
        "producer": ["producer", f"live={video}", f"broken={corrupt}", "--realtime", "--loop"],
        "encoder": ["encoder", "--instance", "mon-0"],
        "query-worker": ["query-worker", "--instance", "mon-0"],
    }
    processes = {name: spawn([*args, "--metrics-port", str(ports[name])], env, tmp_path / f"{name}.log")
                 for name, args in workers.items()}
    try:
        wanted, deadline = named_metrics(), time.monotonic() + 120
        assert UNPROVOKED <= wanted
        while True:
            try:
                scrapes = {name: scrape(port) for name, port in ports.items()}
                missing = wanted - UNPROVOKED - set().union(*(sampled for _, sampled in scrapes.values()))
                if not missing:
                    break
            except OSError:  # a worker still starting: its server is not up yet
                missing = wanted
            assert time.monotonic() < deadline, f"no worker exports samples of {sorted(missing)}"
            time.sleep(1)
        for name, (declared, _) in scrapes.items():
            assert wanted <= declared, f"{name} does not declare {sorted(wanted - declared)}"
            status, body = health(ports[name])
            assert status == 200 and body["healthy"] and body["deadline"] == 60.0, (name, body)
            assert compose_probe(name, ports[name]) == 0
            assert listening(processes[name].pid, ports[name]) == {"127.0.0.1"}  # the default bind address
    finally:
        for process in processes.values():
            stop(process)


@pytest.mark.integration
def test_healthz_turns_unhealthy_while_the_exactly_once_loop_is_stalled(kafka_bootstrap, topic_factory):
    """The encoder's and query worker's loop (``run_exactly_once``) over a real processor whose transform blocks,
    as a call that never returns would: /healthz answers 503 past the deadline and 200 again once it goes on."""
    from pipeline.bus.kafka import ExactlyOnceProcessor, at_least_once_producer
    from workers import metrics
    from workers.common import run_exactly_once

    source, port = topic_factory(partitions=1), free_port_pair()
    release, entered, stop_loop = threading.Event(), threading.Event(), threading.Event()

    def transform(batch):
        entered.set()
        release.wait(60)
        return []

    server = metrics.serve(port, "127.0.0.1", health_deadline=1.5)
    processor = ExactlyOnceProcessor([source], f"g-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}", transform,
                                     bootstrap=kafka_bootstrap, consumer_config={"group_instance_id": None})
    loop = threading.Thread(target=run_exactly_once, args=(processor, stop_loop), daemon=True)
    loop.start()
    try:
        wait_for(lambda: health(port)[0] == 200, timeout=30, what="healthy while idle")
        time.sleep(2)
        assert health(port)[0] == 200  # an idle loop still completes polls
        producer = at_least_once_producer(kafka_bootstrap)
        producer.send(source, b"x").get(30)
        producer.close()
        assert entered.wait(60)
        status, body = wait_for(lambda: (h := health(port))[0] == 503 and h, timeout=10, what="503 while stalled")
        assert not body["healthy"] and body["last_poll_seconds_ago"] > 1.5
        release.set()
        wait_for(lambda: health(port)[0] == 200, timeout=30, what="healthy again")
    finally:
        release.set()
        stop_loop.set()
        loop.join(30)
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_a_producer_whose_sources_send_nothing_turns_unhealthy(kafka_bootstrap, tmp_path):
    """A real producer process, bound to the metrics address it is given, answers 503 once its only camera has sent
    nothing for longer than the deadline (the server accepts and stays silent)."""
    silent = socket.create_server(("127.0.0.1", 0))
    camera = f"http://127.0.0.1:{silent.getsockname()[1]}/live.ts"
    port = free_port_pair()
    env = worker_env(kafka_bootstrap, f"mon-{uuid.uuid4().hex[:8]}")
    producer = spawn(["producer", f"cam={camera}", "--metrics-port", str(port), "--metrics-address", "0.0.0.0",
                      "--health-deadline", "4", "--open-timeout", "30"], env, tmp_path / "producer.log")
    try:
        status, body = wait_for(lambda: (h := health(port))[0] == 503 and h, timeout=90,
                                what="503 from a producer without frames")
        assert body["deadline"] == 4.0 and body["last_poll_seconds_ago"] > 4
        assert listening(producer.pid, port) == {"0.0.0.0"}
        assert producer.poll() is None  # still running: a supervisor learns it from /healthz, not from an exit
        assert compose_probe("producer", port) != 0
    finally:
        stop(producer)
        silent.close()


def test_the_lag_gauge_shows_owned_partitions_and_forgets_those_that_left():
    from kafka import TopicPartition
    from prometheus_client import REGISTRY

    from workers.common import publish_lag

    def gauge(tp):
        return REGISTRY.get_sample_value("vmh_consumer_lag_records", {"topic": tp.topic, "partition": str(tp.partition)})

    a, b = TopicPartition("lag-test", 0), TopicPartition("lag-test", 1)
    shown = publish_lag({a: 3, b: 0}, set())
    assert shown == {a, b} and gauge(a) == 3 and gauge(b) == 0
    shown = publish_lag({b: 7}, shown)  # a moved to another member
    assert shown == {b} and gauge(a) is None and gauge(b) == 7
    assert publish_lag({}, shown) == set() and gauge(b) is None
