"""What every worker process shares: stopping on signals, the exactly-once loop and its failure rules, the model
from its checkpoint, records to and from bytes."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from pipeline.bus.kafka import BusError, Outgoing
from pipeline.bus.records import ErrorRecord, MalformedRecord, Record, decode, encode, key_text, record_key
from pipeline.partitions import Origin
from pipeline.redact import redact
from workers import metrics

log = logging.getLogger(__name__)

POISON_RECORD = "poison_record"
EXIT_BUS = 3  # the exit code of a worker that gave up on the bus: restart it, exactly-once recovery does the rest
STOP_GRACE_S = 8.0  # a worker still running this long after SIGTERM or SIGINT exits at once


def stop_on_signals(grace_s: float = STOP_GRACE_S) -> threading.Event:
    """An event set by SIGINT or SIGTERM, so a worker finishes its current batch and closes cleanly. A worker that
    has not exited ``grace_s`` later (blocked in a call to an unreachable broker, say) exits at once, with code 1:
    whatever it had not committed is redone by its successor."""
    stop = threading.Event()

    def deadline() -> None:
        log.error("still running %.0f s after a stop signal; exiting now", grace_s)
        logging.shutdown()
        os._exit(1)

    def on_signal(*_) -> None:
        if not stop.is_set():
            timer = threading.Timer(grace_s, deadline)
            timer.daemon = True
            timer.start()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop


def run_exactly_once(processor, stop: threading.Event, between_batches=lambda: None, lag_every_s: float = 5.0) -> int:
    """Drive an ExactlyOnceProcessor until ``stop``; between batches run side work and, every ``lag_every_s``,
    publish the consumer lag gauge. Returns the worker's exit code: 0 when stopped, ``EXIT_BUS`` when the bus
    failed or a deadline passed (logged), e.g. rebuilding a partition's state could not read the log."""
    from kafka.errors import KafkaError

    next_lag, shown = 0.0, set()
    try:
        while not stop.is_set():
            between_batches()
            processor.process_once(timeout_ms=200)
            metrics.HEARTBEAT.beat()
            if time.monotonic() >= next_lag or processor.assignment() != shown:
                shown = publish_lag(processor.lag(), shown)
                next_lag = time.monotonic() + lag_every_s
    except (BusError, KafkaError) as e:
        log.error("giving up on the bus: %s; exiting with code %d (restart the worker: it resumes from its last "
                  "commit, exactly once)", e, EXIT_BUS)
        return EXIT_BUS
    finally:
        processor.close()
    return 0


def publish_lag(lags: dict, shown: set) -> set:
    """Set the consumer lag gauge of each partition in ``lags`` and drop the gauges of partitions in ``shown`` that
    have left; returns the partitions shown now. A partition whose lag is not known yet (no fetch) is not shown."""
    for tp in shown - lags.keys():
        metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
    for tp, lag in lags.items():
        metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
    return set(lags)


def poison_errors(errors_topic: str):
    """The ExactlyOnceProcessor ``poison`` rule of a worker: a record that keeps failing becomes an error record."""
    def poison(record, error: Exception) -> list[Outgoing]:
        return [error_outgoing(errors_topic, error_at(record, POISON_RECORD,
                                                      f"processing failed repeatedly: {error!r}; skipped"))]

    return poison


def origin(record) -> Origin:
    """Where a consumer record was read."""
    return Origin(record.topic, record.partition, record.offset)


def error_at(record, kind: str, reason: str) -> ErrorRecord:
    """An error record about a consumer record, whatever its key: named by its key (or its partition), citing its
    topic, partition and offset."""
    where = origin(record)
    return ErrorRecord(source=key_text(record.key, f"{where.topic}[{where.partition}]"), kind=kind,
                       message=f"{where}: {reason[:2000]}", time=time.time(), context=where.context())


def use_threads(threads: int) -> None:
    """Apply the torch-threads setting; 0 means one thread per worker process. Idle OpenMP threads spin for a while
    after each op, so several workers with a thread per core each starve one another (the e2e benchmark: 1 stream
    within the latency bound with torch's default, all 8 tried with one thread); scale out with more worker processes."""
    import torch

    torch.set_num_threads(threads or 1)


def return_large_buffers() -> None:
    """Have glibc give large freed buffers (CNN activations, frames) back to the system at once. By default it raises
    its mmap threshold whenever such a buffer is freed, after which they come from the heap, whose fragments it keeps:
    an overloaded producer of 10 streams grew from 1.30 to 1.54 GB in 90 s so, and stayed at 1.2 GB with the
    threshold fixed at 1 MB. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def load_model(checkpoint: str, device):
    """The CMHN of a checkpoint on ``device`` in eval mode, and a short id naming its code space."""
    from pipeline.model import load_checkpoint

    model, config = load_checkpoint(checkpoint, map_location=device)
    digest = hashlib.sha256(Path(checkpoint, "weights.pt").read_bytes()).hexdigest()[:12]
    return model.eval(), config, f"{config['preset']}-{config['bits']}b-{digest}"


def outgoing(topic: str, record: Record) -> Outgoing:
    return Outgoing(topic, encode(record), record_key(record))


def error_outgoing(topic: str, error: ErrorRecord) -> Outgoing:
    """An error record to publish, redacted (its message may quote a source URL or an exception); counted by
    kind and logged once, quietly."""
    error = replace(error, source=redact(error.source), message=redact(error.message))
    metrics.ERRORS.labels(error.kind).inc()
    log.warning("%s", error.message, extra={"fields": {"kind": error.kind, "source": error.source}})
    return outgoing(topic, error)


def decode_batch(records, expected: type, errors_topic: str) -> tuple[list, list[Origin], list[Outgoing]]:
    """Decode consumer records into ``expected`` records and their origins; malformed ones become error records,
    never exceptions."""
    from pipeline.bus.records import MALFORMED_RECORD

    good, origins, bad = [], [], []
    for record in records:
        try:
            good.append(decode(record.value, expected))
            origins.append(origin(record))
        except MalformedRecord as e:
            bad.append(error_outgoing(errors_topic, error_at(record, MALFORMED_RECORD, str(e))))
    return good, origins, bad


def key_history(at: Origin, key: bytes, timestamp_ms: int, expected: type, lookback_s: float, bootstrap: str,
                enough=lambda found: True) -> list:
    """Decoded records with ``key`` that precede offset ``at`` on its partition, from ``lookback_s`` seconds of
    record time before ``timestamp_ms``; the window doubles while ``enough(found)`` is false and older records exist.

    This is how a worker rebuilds a stream's state after a restart or a partition move: everything before the
    record's offset was committed by a previous owner, everything from it on is this worker's to process."""
    from pipeline.bus.kafka import offset_for_time, read_range

    topic, partition, end = at
    while True:
        since_ms = max(0, int(timestamp_ms - lookback_s * 1000))
        start = offset_for_time(topic, partition, since_ms, bootstrap=bootstrap)
        found = []
        for earlier in read_range(topic, partition, start, end, bootstrap=bootstrap):
            if earlier.key == key:
                try:
                    found.append(decode(earlier.value, expected))
                except MalformedRecord:
                    continue
        if since_ms == 0 or enough(found):
            return found
        lookback_s *= 2
