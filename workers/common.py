"""What every worker process shares: stopping on signals, the model from its checkpoint, records to and from bytes."""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from pipeline.bus.kafka import Outgoing
from pipeline.bus.records import ErrorRecord, MalformedRecord, Record, decode, encode, record_key
from pipeline.redact import redact
from workers import metrics

log = logging.getLogger(__name__)


class StreamPartitions:
    """Which partition each stream's records come from, so per-stream state can follow partition moves."""

    def __init__(self) -> None:
        self._partition: dict[str, tuple[str, int]] = {}

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._partition

    def note(self, stream_id: str, topic: str, partition: int) -> None:
        self._partition[stream_id] = (topic, partition)

    def take(self, partitions) -> list[str]:
        """Forget and return the streams of ``partitions`` (TopicPartitions, which compare equal to tuples)."""
        gone = [stream_id for stream_id, tp in self._partition.items() if tp in partitions]
        for stream_id in gone:
            del self._partition[stream_id]
        return gone


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so a worker finishes its current batch and closes cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_exactly_once(processor, stop: threading.Event, between_batches=lambda: None, lag_every_s: float = 5.0) -> None:
    """Drive an ExactlyOnceProcessor until ``stop``; between batches run side work and, every ``lag_every_s``,
    publish the consumer lag gauge."""
    next_lag = 0.0
    try:
        while not stop.is_set():
            between_batches()
            processor.process_once(timeout_ms=200)
            if time.monotonic() >= next_lag:
                for tp, lag in processor.lag().items():
                    metrics.CONSUMER_LAG.labels(tp.topic, tp.partition).set(lag)
                next_lag = time.monotonic() + lag_every_s
    finally:
        processor.close()


def use_threads(threads: int) -> None:
    """Apply the torch-threads setting; 0 means one thread per worker process. Idle OpenMP threads spin for a while
    after each op, so several workers with a thread per core each starve one another (the e2e benchmark: 1 stream
    within the latency bound with torch's default, all 8 tried with one thread); scale out with more worker processes."""
    import torch

    torch.set_num_threads(threads or 1)


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


def decode_batch(records, expected: type, errors_topic: str) -> tuple[list, list[Outgoing]]:
    """Decode consumer records into ``expected`` records; malformed ones become error records, never exceptions."""
    good, bad = [], []
    for record in records:
        try:
            good.append((record, decode(record.value, expected)))
        except MalformedRecord as e:
            source = record.key.decode("utf-8", "replace") if record.key else f"{record.topic}[{record.partition}]"
            error = ErrorRecord(
                source=source[:256] or "unknown",
                kind="malformed_record",
                message=f"{record.topic}[{record.partition}]@{record.offset}: {e}",
                time=time.time(),
                context={"topic": record.topic, "partition": record.partition, "offset": record.offset},
            )
            bad.append(error_outgoing(errors_topic, error))
    return good, bad


def key_history(record, expected: type, lookback_s: float, bootstrap: str, enough=lambda found: True) -> list:
    """Decoded records with ``record``'s key that precede it on its partition, from ``lookback_s`` seconds of
    record time before it; the window doubles while ``enough(found)`` is false and older records exist.

    This is how a worker rebuilds a stream's state after a restart or a partition move: everything before the
    record's offset was committed by a previous owner, everything from it on is this worker's to process."""
    from pipeline.bus.kafka import offset_for_time, read_range

    topic, partition, end = record.topic, record.partition, record.offset
    while True:
        since_ms = max(0, int(record.timestamp - lookback_s * 1000))
        start = offset_for_time(topic, partition, since_ms, bootstrap=bootstrap)
        found = []
        for earlier in read_range(topic, partition, start, end, bootstrap=bootstrap):
            if earlier.key == record.key:
                try:
                    found.append(decode(earlier.value, expected))
                except MalformedRecord:
                    continue
        if since_ms == 0 or enough(found):
            return found
        lookback_s *= 2
