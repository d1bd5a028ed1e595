"""Quiet by default: one JSON line per record, and kafka-python's slow-step diagnostics only at DEBUG."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import logs

SLOW_STEP = ("Task %r ran for %.3fs (>%.3fs threshold). It is blocking the event loop -- likely a tight sync loop "
             "inside a coroutine. Other pollers will time out.", "<Task>", 0.2, 0.1)


@pytest.fixture
def restore_logging():
    yield
    logs.configure("WARNING")


def test_kafka_slow_step_warnings_are_kept_for_debug(capsys: pytest.CaptureFixture, restore_logging) -> None:
    selector = logging.getLogger("kafka.net.selector")
    logs.configure("WARNING")
    selector.warning(*SLOW_STEP)
    selector.warning("During exception %s, caught additional error %s (ignoring)", "a", "b")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("kafka.net.selector", "During exception a, caught additional error b (ignoring)")]
    logs.configure("DEBUG")
    selector.warning(*SLOW_STEP)
    assert "ran for 0.200s" in json.loads(capsys.readouterr().err.splitlines()[-1])["msg"]
