"""`vmh producer` (alias `vmh push`): decode live sources, one feature record per stream second onto Kafka.

A thin loop around :class:`pipeline.features.live.LiveFeaturizer`: decoded frames of all streams are batched
through the CNN; records go out keyed by stream id with an idempotent producer (at-least-once: a restarted producer
starts its streams again at second 0). A bad source becomes an error record while the other streams go on.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from pipeline.redact import redact
from pipeline.settings import add_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="[ID=]SOURCE",
                        help="file path, rtsp://, rtmp://, http(s):// (HLS or progressive), /dev/videoN or device:N; "
                             "the stream id defaults to a name derived from the source")
    parser.add_argument("--realtime", action="store_true", help="pace files as if they were live")
    parser.add_argument("--loop", action="store_true", help="repeat files forever")
    parser.add_argument("--batch-frames", type=int, default=64, help="most frames per CNN batch, across streams")
    add_settings(parser, "sample-rate", "frame-size", "backbone", "backbone-weights", "device", "torch-threads",
                 "open-timeout", "stall-timeout", "bootstrap-servers", "topic-prefix", "metrics-port")


def stream_spec(spec: str) -> tuple[str, str]:
    """``ID=SOURCE`` or ``SOURCE``: (stream id, source). Derived ids keep letters, digits, '.', '_' and '-' of the
    redacted source (no user info or query string: the id is in every record, log line and metric label)."""
    if "=" in spec and "://" not in spec.split("=", 1)[0]:
        stream_id, source = spec.split("=", 1)
    else:
        source = spec
        path = redact(spec).split("://", 1)[-1].rstrip("/")
        stream_id = Path(path).stem if "://" not in spec else path
    stream_id = re.sub(r"[^A-Za-z0-9._-]+", "-", stream_id).strip("-")
    if not stream_id or not source:
        raise SystemExit(f"vmh producer: cannot name the stream of {redact(spec)!r}; write it as ID=SOURCE")
    return stream_id, source


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.kafka import at_least_once_producer, bootstrap_servers
    from pipeline.bus.topics import create_topics, topics
    from pipeline.features.backbone import FrameEncoder
    from pipeline.features.live import LiveFeaturizer
    from pipeline.video.multi import MultiSource
    from pipeline.video.source import SourceOptions, VideoSource
    from workers import metrics
    from workers.common import error_outgoing, outgoing, stop_on_signals, use_threads

    use_threads(args.torch_threads)
    specs = [stream_spec(s) for s in args.sources]
    if len({i for i, _ in specs}) != len(specs):
        raise SystemExit(f"vmh producer: stream ids repeat: {[i for i, _ in specs]}; name them as ID=SOURCE")
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port)
    featurizer = LiveFeaturizer(FrameEncoder.from_args(args))
    producer = at_least_once_producer(bootstrap)
    options = SourceOptions.from_args(args, realtime=args.realtime, loop=args.loop)
    stop = stop_on_signals()
    with MultiSource(VideoSource(source, stream_id, options) for stream_id, source in specs) as streams:
        for items in streams.batches(args.batch_frames):
            started = time.perf_counter()
            done = featurizer.process(items)
            metrics.STAGE_LATENCY.labels("features").observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.labels("features").observe(sum(done.frames.values()))
            for record in done.records:
                producer.send(**_send_args(outgoing(names.features, record)))
                metrics.VIDEO_SECONDS.labels(record.stream_id).inc()
            for stream_id, count in done.frames.items():
                metrics.FRAMES_DECODED.labels(stream_id).inc(count)
            for error in done.errors:
                producer.send(**_send_args(error_outgoing(names.errors, error)))
            for stream_id in done.ended:
                log.info("stream ended", extra={"fields": {"stream": stream_id}})
            if stop.is_set():
                break
    producer.flush()
    producer.close()
    return 0


def _send_args(out) -> dict:
    return {"topic": out.topic, "value": out.value, "key": out.key}
