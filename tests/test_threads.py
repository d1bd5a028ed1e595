"""OS thread names and priorities: what the e2e benchmark reads per thread, and what makes decoders yield."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from pipeline.threads import lower_priority, name_library_threads, name_os_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread names and priorities are Linux's")


def in_thread(work) -> dict:
    seen: dict = {}

    def run() -> None:
        work()
        tid = threading.get_native_id()
        seen["name"] = open(f"/proc/self/task/{tid}/comm").read().strip()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, tid)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen


def test_a_thread_names_itself_and_lowers_only_its_own_priority() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = in_thread(lambda: (name_os_thread("decode-a-very-long-stream-id"), lower_priority(3)))
    assert seen == {"name": "decode-a-very-l", "nice": min(19, before + 3)}  # the kernel keeps 15 bytes
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_threads_a_library_started_are_named_by_their_python_name() -> None:
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (ready.set(), done.wait(5)), name="lib-network-thread")
    thread.start()
    ready.wait(5)
    name_library_threads("-network-thread", "kafka-producer")
    assert open(f"/proc/self/task/{thread.native_id}/comm").read().strip() == "kafka-producer"
    done.set()
    thread.join()
