"""OS-level thread names, so `top -H`, `ps -L` and the e2e benchmark can tell a producer's decode threads (and the
codec threads they start, which inherit the name) from its CNN and Kafka threads. Python's thread names stay inside
Python; this writes the kernel's (15 bytes, Linux only, a no-op elsewhere)."""

from __future__ import annotations

import os
import threading


def name_os_thread(name: str, native_id: int | None = None) -> None:
    """Name the calling thread, or the thread ``native_id`` of this process."""
    try:
        with open(f"/proc/self/task/{native_id or threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def lower_priority(steps: int) -> None:
    """Make the calling thread ``steps`` nicer than it is (Linux threads have their own nice value; threads it starts
    inherit it). Unprivileged, and a no-op where threads cannot be reniced."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except (OSError, AttributeError):
        pass


def name_library_threads(suffix: str, name: str) -> None:
    """Give every running Python thread whose name ends with ``suffix`` (one a library started) the OS name ``name``."""
    for thread in threading.enumerate():
        if thread.name.endswith(suffix) and thread.native_id is not None:
            name_os_thread(name, thread.native_id)
