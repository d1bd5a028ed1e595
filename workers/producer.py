"""`vmh producer` (alias `vmh push`): decode live sources, one feature record per stream second onto Kafka.

A thin loop around :class:`pipeline.features.live.LiveFeaturizer`: decoded frames of all streams are batched
through the CNN; records go out keyed by stream id with an idempotent producer (at-least-once: a restarted producer
starts a new session, its streams again at second 0). A bad source becomes an error record while the other streams
go on. Every delivery is checked: a producer that cannot deliver for ``--bus-timeout`` seconds exits non-zero.
With ``--checkpoint`` the frame extractor is the one the model was trained on, whatever the other settings say.
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
    add_settings(parser, "checkpoint", "sample-rate", "frame-size", "spatial-grid", "motion-grid", "motion-planes", "motion-expansion", "backbone", "backbone-weights", "device",
                 "torch-threads", "open-timeout", "stall-timeout", "max-lag", "bootstrap-servers", "topic-prefix", "metrics-port",
                 "metrics-address", "health-deadline", "bus-timeout", "keyframes", "keyframe-size")


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
    from pipeline.bus.kafka import BusError, CheckedProducer, bootstrap_servers
    from pipeline.bus.topics import create_topics, topics
    from pipeline.features.backbone import FrameEncoder
    from pipeline.features.live import LiveFeaturizer
    from pipeline.features.shedding import LoadShedder
    from pipeline.threads import name_library_threads
    from pipeline.video.keyframes import KeyframeSampler
    from pipeline.video.multi import MultiSource
    from pipeline.video.source import SourceOptions, VideoSource
    from workers import metrics
    from workers.common import EXIT_BUS, error_outgoing, outgoing, return_large_buffers, stop_on_signals, use_threads

    use_threads(args.torch_threads)
    return_large_buffers()
    specs = [stream_spec(s) for s in args.sources]
    if len({i for i, _ in specs}) != len(specs):
        raise SystemExit(f"vmh producer: stream ids repeat: {[i for i, _ in specs]}; name them as ID=SOURCE")
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port, args.metrics_address, args.health_deadline)
    trained_on = use_checkpoint_extractor(args)
    encoder = FrameEncoder.from_args(args)
    if trained_on is not None and encoder.identity() != trained_on:
        raise SystemExit(f"vmh producer: this frame extractor is not the one {args.checkpoint} was trained on: "
                         + differences(trained_on, encoder.identity()))
    options = SourceOptions.from_args(args, realtime=args.realtime, loop=args.loop)
    sources = [VideoSource(source, stream_id, options) for stream_id, source in specs]
    shedder = LoadShedder(args.max_lag, [s.stream_id for s in sources if s.live or args.realtime])
    featurizer = LiveFeaturizer(encoder, shedder=shedder)
    producer = CheckedProducer(bootstrap, args.bus_timeout, on_failure=lambda error: metrics.DELIVERY_ERRORS.inc())
    name_library_threads("-network-thread", "kafka-producer")
    keyframes = KeyframeSampler(args.keyframe_size) if args.keyframes else None
    stop = stop_on_signals()
    log.info("producer running", extra={"fields": {"session": featurizer.session, "extractor": featurizer.extractor}})
    try:
        with MultiSource(sources) as streams:
            for items in streams.batches(args.batch_frames, stop):
                metrics.HEARTBEAT.beat()  # a batch of decoded frames, or a stream's end, came through
                started, cpu = time.perf_counter(), time.thread_time()
                done = featurizer.process(items)
                metrics.STAGE_LATENCY.labels("features").observe(time.perf_counter() - started)
                metrics.STAGE_CPU.labels("features").inc(time.thread_time() - cpu)
                cpu = time.thread_time()
                metrics.BATCH_SIZE.labels("features").observe(sum(done.frames.values()))
                for record in done.records:
                    producer.send(outgoing(names.features, record))
                    metrics.VIDEO_SECONDS.labels(record.stream_id).inc()
                metrics.STAGE_CPU.labels("publish").inc(time.thread_time() - cpu)
                if keyframes is not None:
                    keyframes.add(items)
                    for keyframe in keyframes.take(done.records):
                        producer.send(outgoing(names.keyframes, keyframe))
                for stream_id, count in done.frames.items():
                    metrics.FRAMES_DECODED.labels(stream_id).inc(count)
                for stream_id, seconds in done.dropped.items():
                    metrics.DROPPED_SECONDS.labels(stream_id).inc(seconds)
                for error in done.errors:
                    producer.send(error_outgoing(names.errors, error))
                for stream_id in done.ended:
                    log.info("stream ended", extra={"fields": {"stream": stream_id}})
        producer.flush()
    except BusError as e:
        log.error("cannot deliver to Kafka: %s; exiting with code %d", e, EXIT_BUS)
        return EXIT_BUS
    finally:
        producer.close()
    return 0


def use_checkpoint_extractor(args: argparse.Namespace) -> dict | None:
    """With ``--checkpoint``, take backbone, frame size, sample rate, spatial and motion grids, motion planes and expansion from the
    extractor the model was trained on (the checkpoint's config records its identity), and return that identity; None without a checkpoint."""
    from pipeline.features import MOTION_EXPANSIONS, MOTION_PLANES, recorded_extractor

    if not args.checkpoint:
        return None
    try:
        identity = recorded_extractor(args.checkpoint)
        args.backbone, args.frame_size, args.sample_rate = (identity["backbone"], int(identity["frame_size"]),
                                                            float(identity["sample_rate"]))
        args.spatial_grid, args.motion_grid = int(identity["spatial_grid"]), int(identity["motion_grid"])
        args.motion_planes = identity.get("motion_planes", MOTION_PLANES[0])  # recorded where there is motion
        args.motion_expansion = identity.get("motion_expansion", MOTION_EXPANSIONS[0])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"vmh producer: cannot read the frame extractor of checkpoint {args.checkpoint}: {e!r}")
    return identity


def differences(expected: dict, found: dict) -> str:
    return "; ".join(f"{key}: checkpoint {expected.get(key)!r}, here {found.get(key)!r}"
                     for key in sorted({*expected, *found}) if expected.get(key) != found.get(key))
