"""`vmh encoder`: frame features in, moment codes out, exactly once.

A thin loop: each polled batch of feature records goes through :class:`pipeline.codes.live.LiveCoder` and its
moment codes and error records are committed in one Kafka transaction with the batch's offsets. A stream whose
state this process does not hold (after a restart or a partition move) is first rebuilt from the features topic:
its records before the current one, back one receptive field, so its codes equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time

from pipeline.settings import add_settings

from workers.common import StreamPartitions, use_threads

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "checkpoint", "device", "torch-threads", "bootstrap-servers", "topic-prefix", "metrics-port")
    parser.add_argument("--group", default=None,
                        help="consumer group of the encoder workers [default: <topic-prefix>-encoder]")
    parser.add_argument("--instance", default=socket.gethostname(),
                        help="stable name of this instance; its transactional id fences a predecessor of the same name")
    parser.add_argument("--batch-records", type=int, default=500, help="most input records per transaction")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.kafka import ExactlyOnceProcessor, bootstrap_servers
    from pipeline.bus.topics import create_topics, topics
    from pipeline.codes.live import LiveCoder
    from pipeline.device import pick_device
    from pipeline.model import StreamingEncoder
    from workers import metrics
    from workers.common import load_model, run_exactly_once, stop_on_signals

    use_threads(args.torch_threads)
    if not args.checkpoint:
        raise SystemExit("vmh encoder: --checkpoint (VMH_CHECKPOINT) is required: train one with `vmh train` or `vmh demo`")
    device = pick_device(args.device)
    model, _, model_id = load_model(args.checkpoint, device)
    coder = LiveCoder(StreamingEncoder(model, device), bits=model.config.bits, model=model_id)
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    group = args.group or f"{args.topic_prefix}-encoder"
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port)
    worker = EncoderWorker(coder, names, bootstrap)
    processor = ExactlyOnceProcessor(
        [names.features], group, f"{group}-{args.instance}", worker.transform,
        on_revoke=worker.forget, bootstrap=bootstrap, max_poll_records=args.batch_records,
    )
    log.info("encoder running", extra={"fields": {"device": str(device), "model": model_id}})
    run_exactly_once(processor, stop_on_signals())
    return 0


class EncoderWorker:
    """The transform of the encoder's exactly-once loop, with the Kafka reads that rebuilding state needs."""

    def __init__(self, coder, names, bootstrap: str) -> None:
        self.coder, self.names, self.bootstrap = coder, names, bootstrap
        self.streams = StreamPartitions()

    def forget(self, partitions) -> None:
        """Drop the state of streams on partitions this worker no longer owns."""
        for stream_id in self.streams.take(partitions):
            self.coder.encoder.drop(stream_id)

    def transform(self, batch):
        from pipeline.bus.records import FrameFeatures
        from workers import metrics
        from workers.common import decode_batch, error_outgoing, outgoing

        started = time.perf_counter()
        decoded, out = decode_batch(batch, FrameFeatures, self.names.errors)
        errors = []
        for consumer_record, features in decoded:
            first_of_stream = features.stream_id not in self.streams
            self.streams.note(features.stream_id, consumer_record.topic, consumer_record.partition)
            if first_of_stream and self.coder.needs_history(features):
                errors += self.coder.restore(features.stream_id, self._history(consumer_record, features), features.t)
        moments, skipped = self.coder.encode(features for _, features in decoded)
        out += [error_outgoing(self.names.errors, e) for e in errors + skipped]
        out += [outgoing(self.names.moments, m) for m in moments]
        metrics.BATCH_SIZE.labels("encoder").observe(len(batch))
        metrics.STAGE_LATENCY.labels("encoder").observe(time.perf_counter() - started)
        metrics.MOMENTS.inc(len(moments))
        return out

    def _history(self, consumer_record, features):
        """The stream's feature records before this one, back one receptive field of seconds (records are
        stamped at capture, so that many seconds of record time, plus slack, usually hold them)."""
        from pipeline.bus.records import FrameFeatures
        from workers.common import key_history

        want = set(range(max(0, features.t - self.coder.history_seconds), features.t))
        return key_history(consumer_record, FrameFeatures, 2 * len(want) + 30, self.bootstrap,
                           enough=lambda found: want <= {r.t for r in found})
