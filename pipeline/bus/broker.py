"""A real single-node Apache Kafka broker (KRaft), started by the project itself.

Nothing installs Kafka from PyPI, but its jars are on Maven Central: the first start resolves them once with
``mvn dependency:copy-dependencies`` into the cache dir, formats a data dir with ``kafka.tools.StorageTool`` and
runs ``kafka.Kafka`` as a combined broker and controller on loopback. A small JSON state file per port
(``<cache-dir>/brokers/<port>.json``) records pid, port, data dir and security, so ``vmh broker status|stop`` and
the bus's bootstrap resolution find a broker that another process started.

The client listener speaks what the ``kafka-*`` settings ask the clients to speak: PLAINTEXT, or SASL_PLAINTEXT
with a SCRAM user that is created when the storage is formatted (``--add-scram``), so the same vmh.toml serves
the broker and every worker. The controller listener stays PLAINTEXT on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
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
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from pipeline.redact import keep_secret
from pipeline.settings import resolve

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.2"
MIN_JAVA = 17
# a fixed heap, touched at start, as Kafka's own start script fixes it (-Xms = -Xmx): one that grows from a small -Xms
# shows as the broker's RSS creeping for minutes under a steady load (365 to 419 MB in a 10-minute soak)
JVM_OPTIONS = ("-Xms512m", "-Xmx512m", "-XX:+AlwaysPreTouch", "-XX:+UseSerialGC", "-Djava.awt.headless=true")


class BrokerError(RuntimeError):
    """The local broker cannot be set up, started or stopped."""


@dataclass(frozen=True)
class Scram:
    """The SCRAM user a SASL_PLAINTEXT client listener authenticates (the broker also uses it for itself)."""

    mechanism: str  # SCRAM-SHA-256 or SCRAM-SHA-512
    username: str
    password: str = field(repr=False)
    ITERATIONS = 4096  # Kafka's default and minimum

    def __post_init__(self) -> None:
        if self.mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise BrokerError(f"the local broker authenticates SCRAM-SHA-256 or SCRAM-SHA-512, not {self.mechanism}")
        if not self.username or not self.password:
            raise BrokerError("a SCRAM user needs a user name and a password")
        if any(c in self.username for c in ',"') or not self.username.isprintable():
            raise BrokerError(f"SCRAM user name {self.username!r}: commas, quotes and control characters are not "
                              "allowed by kafka-storage --add-scram")
        keep_secret(self.password)  # it is in the broker's properties and its clients' configs: never in a log

    @classmethod
    def from_settings(cls) -> Scram | None:
        """The user the ``kafka-*`` settings log in as, when they ask for SASL_PLAINTEXT (None for PLAINTEXT)."""
        protocol = resolve("kafka-security-protocol").upper()
        if protocol == "PLAINTEXT":
            return None
        if protocol != "SASL_PLAINTEXT":
            raise BrokerError(f"the local broker speaks PLAINTEXT or SASL_PLAINTEXT, but the kafka security "
                              f"protocol setting is {protocol}")
        return cls(resolve("kafka-sasl-mechanism").upper(), resolve("kafka-sasl-username"),
                   resolve("kafka-sasl-password"))

    def add_scram_argument(self, salt: bytes) -> str:
        """``--add-scram``'s value. The salted password is computed here (SCRAM's Hi is PBKDF2-HMAC), so any
        password works: kafka-storage splits its argument at commas and has no escape for them."""
        digest = self.mechanism.removeprefix("SCRAM-").replace("-", "").lower()
        salted = hashlib.pbkdf2_hmac(digest, self.password.encode(), salt, self.ITERATIONS)
        b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
        return (f'{self.mechanism}=[name="{self.username}",iterations={self.ITERATIONS},salt="{b64(salt)}",'
                f'saltedpassword="{b64(salted)}"]')

    def client_config(self) -> dict[str, str]:
        """kafka-python arguments that log in as this user."""
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.username, "sasl_plain_password": self.password}


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    data_dir: str
    security: str = "PLAINTEXT"  # or e.g. "SASL_PLAINTEXT SCRAM-SHA-256 user alice"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def ensure_broker(
    port: int | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    timeout_s: float = 90.0,
    scram: Scram | None = None,
) -> str:
    """Start a broker on ``port`` unless one of ours already runs there; return its bootstrap servers.

    ``scram`` makes the client listener SASL_PLAINTEXT with that user; by default the ``kafka-*`` settings decide
    (:meth:`Scram.from_settings`), so the broker accepts the clients that the same settings configure."""
    port, cache = _port_and_cache(port, cache_dir)
    scram = scram or Scram.from_settings()
    with _locked(cache / "brokers" / ".lock"):
        running = broker_status(port, cache_dir=str(cache))
        if running is not None:
            if data_dir is not None and Path(data_dir).resolve() != Path(running.data_dir):
                raise BrokerError(f"a broker already runs on port {port} with data dir {running.data_dir}, "
                                  f"not {data_dir}")
            if running.security != _security(scram):
                raise BrokerError(f"a broker already runs on port {port} with {running.security}, not "
                                  f"{_security(scram)}; stop it first")
            return running.bootstrap
        java = find_java()
        libs = kafka_libs(str(cache))
        for p in (port, port + 1):
            if not _port_free(p):
                raise BrokerError(f"port {p} on 127.0.0.1 is taken by another process; choose another with --port")
        data = Path(data_dir).resolve() if data_dir is not None else default_data_dir(port, str(cache))
        state = _launch(java, libs, port, data, scram)
        _state_path(port, cache).write_text(json.dumps(asdict(state)))
        try:
            _wait_until_serving(state, timeout_s, scram.client_config() if scram else {})
        except BaseException:
            _terminate(state.pid, timeout_s=10)
            _state_path(port, cache).unlink(missing_ok=True)
            raise
        log.info("Kafka %s broker pid %d serving %s on %s, data in %s", KAFKA_VERSION, state.pid, state.security,
                 state.bootstrap, data)
        return state.bootstrap


def broker_status(
    port: int | None = None, cache_dir: str | None = None, data_dir: str | os.PathLike | None = None,
) -> BrokerState | None:
    """The broker this project started on ``port`` (or with ``data_dir``, whatever its port), or None when none runs
    there (a stale record is removed)."""
    port, cache = _port_and_cache(port, cache_dir)
    if data_dir is not None:
        return _broker_of(Path(data_dir), cache)
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


def stop_broker(
    port: int | None = None, cache_dir: str | None = None, timeout_s: float = 30.0,
    data_dir: str | os.PathLike | None = None,
) -> BrokerState | None:
    """Stop the broker on ``port``, or the one using ``data_dir`` whatever its port (SIGTERM, then SIGKILL after
    ``timeout_s``); return what was stopped, if any."""
    port, cache = _port_and_cache(port, cache_dir)
    with _locked(cache / "brokers" / ".lock"):
        state = broker_status(port, cache_dir=str(cache), data_dir=data_dir)
        if state is not None:
            _terminate(state.pid, timeout_s)
            _state_path(state.port, cache).unlink(missing_ok=True)
        return state


def _broker_of(data_dir: Path, cache: Path) -> BrokerState | None:
    """The running broker of ours whose data dir is ``data_dir``."""
    for path in sorted((cache / "brokers").glob("*.json")):
        state = broker_status(int(path.stem), cache_dir=str(cache))
        if state is not None and Path(state.data_dir) == data_dir.resolve():
            return state
    return None


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


def server_properties(port: int, data_dir: Path, scram: Scram | None = None) -> dict[str, str]:
    """A combined broker+controller on loopback, tuned for one node and fast group joins and transactions.

    With ``scram`` the one client listener is SASL_PLAINTEXT and the broker's own inter-broker connections (e.g.
    transaction markers to itself) log in as the same user; the controller listener stays PLAINTEXT."""
    controller = port + 1
    listener = "SASL_PLAINTEXT" if scram else "PLAINTEXT"
    sasl = {}
    if scram:
        name = f"listener.name.sasl_plaintext.{scram.mechanism.lower()}.sasl.jaas.config"
        sasl = {
            "sasl.enabled.mechanisms": scram.mechanism,
            "sasl.mechanism.inter.broker.protocol": scram.mechanism,
            name: f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                  f'username="{_jaas_quoted(scram.username)}" password="{_jaas_quoted(scram.password)}";',
        }
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"{listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"{listener}://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": listener,
        "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
        **sasl,
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


def _launch(java: str, libs: Path, port: int, data: Path, scram: Scram | None) -> BrokerState:
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    props.touch(mode=0o600)  # with SCRAM it holds the broker's own password
    properties = server_properties(port, data, scram)
    props.write_text("".join(f"{k}={_properties_escaped(v)}\n" for k, v in properties.items()))
    classpath = ["-cp", str(libs / "*")]
    if not (data / "kraft" / "meta.properties").exists():
        format_storage(java, libs, props, new_cluster_id(), scram)
        _remember_user(scram, data)
    elif scram:
        _check_formatted_for(scram, data)
    log4j = data / "log4j2.yaml"
    log4j.write_text(resources.files(__package__).joinpath("kafka-log4j2.yaml").read_text())
    with open(data / "broker.log", "ab") as out:
        proc = subprocess.Popen(
            [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}", *classpath, "kafka.Kafka", str(props)],
            cwd=data, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return BrokerState(pid=proc.pid, port=port, data_dir=str(data), security=_security(scram))


# brokers started by this process, kept so they are reaped (not left as zombies) when stopped
_CHILDREN: dict[int, subprocess.Popen] = {}


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes in URL-safe base64, which begins with '-' one time in 64."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def format_storage(java: str, libs: Path, props: Path, cluster_id: str, scram: Scram | None = None) -> None:
    """``kafka-storage format`` for ``props``, creating the SCRAM user in the bootstrap metadata when given."""
    # --cluster-id=ID: as a separate argument an id that begins with '-' would be taken for an option
    command = [java, "-XX:TieredStopAtLevel=1",  # a short-lived JVM: the C1 compiler alone starts it twice as fast
               "-cp", str(libs / "*"), "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
               "-c", str(props)]
    if scram:
        command.append(f"--add-scram={scram.add_scram_argument(os.urandom(32))}")
    fmt = subprocess.run(command, capture_output=True, text=True)
    if fmt.returncode != 0:
        raise BrokerError(f"formatting {props.parent} failed: {(fmt.stderr or fmt.stdout).strip()[-500:]}")


def _remember_user(scram: Scram | None, data: Path) -> None:
    """Note which SCRAM user the storage was formatted with (mechanism, name, a salted hash of the password)."""
    users = data / _SCRAM_USER
    users.unlink(missing_ok=True)
    if scram:
        salt = os.urandom(16)
        users.touch(mode=0o600)
        users.write_text(json.dumps({"mechanism": scram.mechanism, "username": scram.username,
                                     "salt": salt.hex(), "check": _password_check(scram, salt)}))


def _check_formatted_for(scram: Scram, data: Path) -> None:
    """The SCRAM user exists only if the storage was formatted with it: a start with another user or password
    fails here, clearly, rather than at every login."""
    try:
        formatted = json.loads((data / _SCRAM_USER).read_text())
        same = ((formatted["mechanism"], formatted["username"]) == (scram.mechanism, scram.username)
                and _password_check(scram, bytes.fromhex(formatted["salt"])) == formatted["check"])
    except (FileNotFoundError, ValueError, KeyError):
        same = False
    if not same:
        raise BrokerError(f"{data} was formatted without the SCRAM user {scram.username} ({scram.mechanism}, "
                          "this password); use another --data-dir or delete this one")


_SCRAM_USER = "scram-user.json"


def _password_check(scram: Scram, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", scram.password.encode(), salt, Scram.ITERATIONS).hex()


def _properties_escaped(value: str) -> str:
    """``value`` as a Java .properties value: backslashes doubled, anything beyond printable ASCII as \\uXXXX
    (Kafka reads the file as ISO-8859-1), so a password can hold any character."""
    escaped = value.replace("\\", "\\\\")
    if escaped.isascii() and escaped.isprintable():
        return escaped
    units = escaped.encode("utf-16-be")
    return "".join(chr(unit) if 32 <= unit < 127 else f"\\u{unit:04x}"
                   for unit in (int.from_bytes(units[i:i + 2], "big") for i in range(0, len(units), 2)))


def _jaas_quoted(value: str) -> str:
    """``value`` inside a double-quoted JAAS option."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _security(scram: Scram | None) -> str:
    return f"SASL_PLAINTEXT {scram.mechanism} user {scram.username}" if scram else "PLAINTEXT"


def _wait_until_serving(state: BrokerState, timeout_s: float, client_config: dict[str, str]) -> None:
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
                                         request_timeout_ms=2000, **client_config)
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

    child = _CHILDREN.get(state.pid)
    if child is not None:  # started here: its handle knows, where /proc may be read while the java launcher re-execs
        return child.poll() is None
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
    """A port p with p and p + 1 free on loopback (the broker's client and controller listeners). Drawn below Linux's
    ephemeral range (32768-60999), where any outgoing connection may take a port between this check and its use."""
    for port in random.sample(range(20000, 32766, 2), 200):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports in 20000-32767")
