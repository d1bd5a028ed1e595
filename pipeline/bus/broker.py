"""A real single-node Apache Kafka broker (KRaft), started by the project itself.

Nothing installs Kafka from PyPI, but its jars are on Maven Central: the first start resolves them once with
``mvn dependency:copy-dependencies`` into the cache dir, formats a data dir with ``kafka.tools.StorageTool`` and
runs ``kafka.Kafka`` as a combined broker and controller on loopback. A small JSON state file per port
(``<cache-dir>/brokers/<port>.json``) records pid, port and data dir, so ``vmh broker status|stop`` and the bus's
bootstrap resolution find a broker that another process started.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from pipeline.settings import resolve

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.2"
MIN_JAVA = 17
JVM_OPTIONS = ("-Xmx512m", "-Xms128m", "-XX:+UseSerialGC", "-Djava.awt.headless=true")


class BrokerError(RuntimeError):
    """The local broker cannot be set up, started or stopped."""


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    data_dir: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def ensure_broker(
    port: int | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    timeout_s: float = 90.0,
) -> str:
    """Start a broker on ``port`` unless one of ours already runs there; return its bootstrap servers."""
    port, cache = _port_and_cache(port, cache_dir)
    with _locked(cache / "brokers" / ".lock"):
        running = broker_status(port, cache_dir=str(cache))
        if running is not None:
            if data_dir is not None and Path(data_dir).resolve() != Path(running.data_dir):
                raise BrokerError(f"a broker already runs on port {port} with data dir {running.data_dir}, "
                                  f"not {data_dir}")
            return running.bootstrap
        java = find_java()
        libs = kafka_libs(str(cache))
        for p in (port, port + 1):
            if not _port_free(p):
                raise BrokerError(f"port {p} on 127.0.0.1 is taken by another process; choose another with --port")
        data = Path(data_dir).resolve() if data_dir is not None else default_data_dir(port, str(cache))
        state = _launch(java, libs, port, data)
        _state_path(port, cache).write_text(json.dumps(asdict(state)))
        try:
            _wait_until_serving(state, timeout_s)
        except BaseException:
            _terminate(state.pid, timeout_s=10)
            _state_path(port, cache).unlink(missing_ok=True)
            raise
        log.info("Kafka %s broker pid %d serving on %s, data in %s", KAFKA_VERSION, state.pid, state.bootstrap, data)
        return state.bootstrap


def broker_status(port: int | None = None, cache_dir: str | None = None) -> BrokerState | None:
    """The broker this project started on ``port``, or None when none runs there (a stale record is removed)."""
    port, cache = _port_and_cache(port, cache_dir)
    path = _state_path(port, cache)
    try:
        state = BrokerState(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise BrokerError(f"unreadable broker state file {path}: {e}") from e
    if _is_our_broker(state):
        return state
    path.unlink(missing_ok=True)
    return None


def stop_broker(port: int | None = None, cache_dir: str | None = None, timeout_s: float = 30.0) -> BrokerState | None:
    """Stop the broker on ``port`` (SIGTERM, then SIGKILL after ``timeout_s``); return what was stopped, if any."""
    port, cache = _port_and_cache(port, cache_dir)
    with _locked(cache / "brokers" / ".lock"):
        state = broker_status(port, cache_dir=str(cache))
        if state is not None:
            _terminate(state.pid, timeout_s)
            _state_path(port, cache).unlink(missing_ok=True)
        return state


def default_data_dir(port: int, cache_dir: str | None = None) -> Path:
    return Path(cache_dir or resolve("cache-dir")).resolve() / "brokers" / str(port)


def find_java() -> str:
    """The ``java`` to run Kafka with ($JAVA_HOME first), checked to be version 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    in_home = Path(home) / "bin" / "java" if home else None
    java = str(in_home) if in_home is not None and in_home.is_file() else shutil.which("java")
    if java is None:
        raise BrokerError(f"Java {MIN_JAVA}+ is needed to run the Kafka broker, but `java` is not on PATH "
                          "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        raise BrokerError(f"cannot tell the Java version from `{java} -version`: {out.strip()[:200]}")
    major = int(match[2]) if match[1] == "1" else int(match[1])
    if major < MIN_JAVA:
        raise BrokerError(f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, but {java} is Java {major}")
    return java


def kafka_libs(cache_dir: str | None = None, progress: bool = True) -> Path:
    """The directory of Kafka's runtime jars, resolved from Maven Central on first use."""
    home = Path(cache_dir or resolve("cache-dir")).resolve() / f"kafka-{KAFKA_VERSION}"
    libs, done = home / "libs", home / "libs.complete"
    if done.exists():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / "resolve.lock"):
        if not done.exists():
            mvn = shutil.which("mvn")
            if mvn is None:
                raise BrokerError(f"Maven is needed once to fetch the Kafka {KAFKA_VERSION} jars, but `mvn` is not "
                                  "on PATH (Debian/Ubuntu: apt-get install maven)")
            pom = home / "pom.xml"
            pom.write_text(resources.files(__package__).joinpath("kafka-pom.xml").read_text())
            shutil.rmtree(libs, ignore_errors=True)
            _run_maven([mvn, "-B", "-f", str(pom), "dependency:copy-dependencies", "-DincludeScope=runtime",
                        f"-DoutputDirectory={libs}"], progress)
            done.write_text(f"{len(list(libs.glob('*.jar')))} jars\n")
    return libs


def server_properties(port: int, data_dir: Path) -> dict[str, str]:
    """A combined broker+controller on loopback, tuned for one node and fast group joins and transactions."""
    controller = port + 1
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir / "kraft"),
        "num.partitions": "4",
        "default.replication.factor": "1",
        # workers create their topics with the right configs (pipeline.bus.topics); a misspelt name fails loudly
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
        "log.retention.check.interval.ms": "60000",
    }


def _launch(java: str, libs: Path, port: int, data: Path) -> BrokerState:
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    props.write_text("".join(f"{k}={v}\n" for k, v in server_properties(port, data).items()))
    classpath = ["-cp", str(libs / "*")]
    if not (data / "kraft" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # a short-lived JVM: the C1 compiler alone starts it about twice as fast
        fmt = subprocess.run(
            [java, "-XX:TieredStopAtLevel=1", *classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
             "-c", str(props)],
            capture_output=True, text=True,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting {data} failed: {(fmt.stderr or fmt.stdout).strip()[-500:]}")
    log4j = data / "log4j2.yaml"
    log4j.write_text(resources.files(__package__).joinpath("kafka-log4j2.yaml").read_text())
    with open(data / "broker.log", "ab") as out:
        proc = subprocess.Popen(
            [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}", *classpath, "kafka.Kafka", str(props)],
            cwd=data, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return BrokerState(pid=proc.pid, port=port, data_dir=str(data))


# brokers started by this process, kept so they are reaped (not left as zombies) when stopped
_CHILDREN: dict[int, subprocess.Popen] = {}


def _wait_until_serving(state: BrokerState, timeout_s: float) -> None:
    """Block until the broker answers a metadata request with itself in it (a TCP connect is not enough)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    with _quiet("kafka"):  # connection refused is expected until the broker listens
        while time.monotonic() < deadline:
            if not _is_our_broker(state):
                raise BrokerError(f"the broker exited while starting; see {state.data_dir}/broker.log:\n"
                                  f"{_log_tail(state)}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=state.bootstrap, bootstrap_timeout_ms=1000,
                                         request_timeout_ms=2000)
                try:
                    if any(not b.get("is_fenced") for b in admin.describe_cluster()["brokers"]):
                        return
                finally:
                    admin.close()
            except KafkaError:
                pass
            time.sleep(0.2)
    raise BrokerError(f"the broker did not answer on {state.bootstrap} within {timeout_s:.0f} s; "
                      f"see {state.data_dir}/broker.log:\n{_log_tail(state)}")


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM (Kafka shuts down cleanly on it), then SIGKILL if it is still there after ``timeout_s``."""
    import psutil

    child = _CHILDREN.pop(pid, None)
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except psutil.TimeoutExpired:
            log.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
            proc.kill()
            proc.wait(10)
    except psutil.NoSuchProcess:
        pass
    if child is not None:
        child.wait()


def _is_our_broker(state: BrokerState) -> bool:
    """True when ``state.pid`` is alive and is the kafka.Kafka process of that data dir (pids get reused)."""
    import psutil

    try:
        proc = psutil.Process(state.pid)
        props = str(Path(state.data_dir) / "server.properties")
        return proc.status() != psutil.STATUS_ZOMBIE and props in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _run_maven(command: list[str], progress: bool) -> None:
    """Run Maven, one progress step per artifact it downloads or copies; raise with its last lines on failure."""
    from tqdm import tqdm

    tail: list[str] = []
    artifact = re.compile(r"(?:Downloaded from \S+: \S+/|Copying )([^/\s]+\.(?:jar|pom))")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, tqdm(
        desc=f"Kafka {KAFKA_VERSION} jars from Maven Central", unit=" files", disable=not progress, file=sys.stderr
    ) as bar:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-25:]
            found = artifact.search(line)
            if found:
                bar.set_postfix_str(found[1], refresh=False)
                bar.update()
    if proc.returncode != 0:
        raise BrokerError("Maven could not fetch the Kafka jars (is Maven Central reachable?):\n" + "\n".join(tail))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _log_tail(state: BrokerState, lines: int = 20) -> str:
    try:
        return "\n".join((Path(state.data_dir) / "broker.log").read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no broker.log)"


def _port_and_cache(port: int | None, cache_dir: str | None) -> tuple[int, Path]:
    cache = Path(cache_dir or resolve("cache-dir")).resolve()
    (cache / "brokers").mkdir(parents=True, exist_ok=True)
    return (int(resolve("broker-port")) if port is None else port), cache


def _state_path(port: int, cache: Path) -> Path:
    return cache / "brokers" / f"{port}.json"


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, so two starters or stoppers do not race."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (the broker's client and controller listeners)."""
    for port in random.sample(range(20000, 40000, 2), 200):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports in 20000-40000")
