"""What every worker process shares: stopping on signals, the model from its checkpoint, records to and from bytes."""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from pathlib import Path

from pipeline.bus.kafka import Outgoing
from pipeline.bus.records import ErrorRecord, MalformedRecord, Record, decode, encode, record_key
from workers import metrics

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so a worker finishes its current batch and closes cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def load_model(checkpoint: str, device):
    """The CMHN of a checkpoint on ``device`` in eval mode, and a short id naming its code space."""
    from pipeline.model import load_checkpoint

    model, config = load_checkpoint(checkpoint, map_location=device)
    digest = hashlib.sha256(Path(checkpoint, "weights.pt").read_bytes()).hexdigest()[:12]
    return model.eval(), config, f"{config['preset']}-{config['bits']}b-{digest}"


def outgoing(topic: str, record: Record) -> Outgoing:
    return Outgoing(topic, encode(record), record_key(record))


def error_outgoing(topic: str, error: ErrorRecord) -> Outgoing:
    """An error record to publish; counted by kind and logged once, quietly."""
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
