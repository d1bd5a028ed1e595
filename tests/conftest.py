"""Shared fixtures for tests that need the real Kafka broker.

``kafka_bootstrap`` is an existing cluster when VMH_BOOTSTRAP_SERVERS is set, else a broker this test session
starts on a random free port with a temporary data dir (about 5 s, once per session) and stops at the end. Every
client connects with the Kafka security settings (VMH_KAFKA_*, vmh.toml), so the suite runs against a secured
cluster too.
``topic_factory`` makes topics with unique names, so tests never see each other's records.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Callable, Iterator

import pytest

from pipeline.bus.broker import free_port_pair


@pytest.fixture
def one_thread_seeded():
    """Seeded; tiny convs run faster on one thread than on two cores shared with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("VMH_BOOTSTRAP_SERVERS")
    if existing:
        yield existing
        return
    from pipeline.bus.broker import ensure_broker, stop_broker

    port = free_port_pair()
    bootstrap = ensure_broker(port, data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        yield bootstrap
    finally:
        stop_broker(port)
        # a client some failed test left open would log its lost connection from kafka-python's IO thread after
        # pytest has closed its capture streams, burying the test summary under logging tracebacks
        logging.raiseExceptions = False


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``make(partitions=4, configs=None) -> name``: a new topic named after the test; deleted afterwards."""
    from pipeline.bus.kafka import admin_client

    admin = admin_client(kafka_bootstrap)
    made: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:80]

    def make(partitions: int = 4, configs: dict[str, str] | None = None) -> str:
        name = f"test.{stem}.{uuid.uuid4().hex[:8]}"
        admin.create_topics({name: {"num_partitions": partitions, "replication_factor": -1, "configs": configs or {}}})
        admin.wait_for_topics([name])
        made.append(name)
        return name

    yield make
    if made:
        admin.delete_topics(made, raise_errors=False)
    admin.close()
