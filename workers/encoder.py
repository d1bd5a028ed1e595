"""`vmh encoder`: frame features in, moment codes out, exactly once.

A thin loop: each polled batch of feature records goes through :class:`pipeline.codes.live.LiveCoder` and its
moment codes and error records are committed in one Kafka transaction with the batch's offsets. The coder owns the
per-stream state; when it lacks a stream's state (after a restart or a partition move) the worker hands it the
stream's earlier records from the features topic, back one receptive field, so its codes equal those of an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time

from pipeline.settings import add_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "checkpoint", "device", "torch-threads", "bootstrap-servers", "topic-prefix", "metrics-port",
                 "metrics-address", "health-deadline", "stream-idle-timeout", "bus-timeout")
    parser.add_argument("--group", default=None,
                        help="consumer group of the encoder workers [default: <topic-prefix>-encoder]")
    parser.add_argument("--instance", default=socket.gethostname(),
                        help="stable name of this instance; its transactional id fences a predecessor of the same name")
    parser.add_argument("--batch-records", type=int, default=500, help="most input records per transaction")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.kafka import ExactlyOnceProcessor, bootstrap_servers
    from pipeline.bus.records import extractor_id
    from pipeline.bus.topics import create_topics, topics
    from pipeline.codes.live import LiveCoder
    from pipeline.device import pick_device
    from pipeline.model import StreamingEncoder
    from workers import metrics
    from workers.common import load_model, poison_errors, run_exactly_once, stop_on_signals, use_threads

    use_threads(args.torch_threads)
    if not args.checkpoint:
        raise SystemExit("vmh encoder: --checkpoint (VMH_CHECKPOINT) is required: train one with `vmh train` or `vmh demo`")
    device = pick_device(args.device)
    model, config, model_id = load_model(args.checkpoint, device)
    coder = LiveCoder(StreamingEncoder(model, device), bits=model.config.bits, model=model_id,
                      extractor=extractor_id(config["extractor"]), idle_timeout=args.stream_idle_timeout)
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    group = args.group or f"{args.topic_prefix}-encoder"
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port, args.metrics_address, args.health_deadline)
    worker = EncoderWorker(coder, names, bootstrap)
    stop = stop_on_signals()
    processor = ExactlyOnceProcessor(
        [names.features], group, f"{group}-{args.instance}", worker.transform, on_revoke=coder.forget,
        poison=poison_errors(names.errors), timeout_s=args.bus_timeout, bootstrap=bootstrap,
        max_poll_records=args.batch_records,
    )
    log.info("encoder running", extra={"fields": {"device": str(device), "model": model_id}})
    return run_exactly_once(processor, stop)


class EncoderWorker:
    """The transform of the encoder's exactly-once loop, with the Kafka reads that rebuilding state needs."""

    def __init__(self, coder, names, bootstrap: str) -> None:
        self.coder, self.names, self.bootstrap = coder, names, bootstrap
        self._timestamps: dict = {}  # origin -> record timestamp, of the batch being transformed

    def transform(self, batch):
        from pipeline.bus.records import FrameFeatures
        from workers import metrics
        from workers.common import decode_batch, error_outgoing, origin, outgoing

        started = time.perf_counter()
        decoded, origins, out = decode_batch(batch, FrameFeatures, self.names.errors)
        self._timestamps = {origin(r): r.timestamp for r in batch}
        moments, errors = self.coder.encode(decoded, origins, history=self._history)
        out += [error_outgoing(self.names.errors, e) for e in errors]
        out += [outgoing(self.names.moments, m) for m in moments]
        metrics.BATCH_SIZE.labels("encoder").observe(len(batch))
        metrics.STAGE_LATENCY.labels("encoder").observe(time.perf_counter() - started)
        metrics.MOMENTS.inc(len(moments))
        metrics.STREAMS.labels("encoder").set(len(self.coder))
        return out

    def _history(self, features, at):
        """The stream's feature records before this one, back one receptive field of seconds (records are
        stamped at capture, so that many seconds of record time, plus slack, usually hold them)."""
        from pipeline.bus.records import FrameFeatures, record_key
        from workers.common import key_history

        since = max(0, features.t - self.coder.history_seconds)
        # enough: back to the window's start, or to a hole the producer announced across it
        return key_history(at, record_key(features), self._timestamps[at], FrameFeatures,
                           2 * (features.t - since) + 30, self.bootstrap,
                           enough=lambda found: any(r.announced_from <= since for r in found
                                                    if r.session == features.session))
