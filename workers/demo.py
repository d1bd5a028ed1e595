"""`vmh demo`: the main job on a fresh machine.

The first run renders a small synthetic dataset, extracts its features through the producer's frame path, trains
the lite model and calibrates a match threshold, all cached under <cache-dir>/demo. Every run then starts the
broker (unless one is given) and the workers, registers the captions of a held-out video as standing text queries,
pushes that video as a live stream in real time and prints each match event as it arrives, marked hit or miss
against the ground truth, then a summary. It is a script of the user-facing commands (synth, extract, train, up,
query add, push, subscribe), run in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import uuid
from pathlib import Path

from pipeline.settings import add_settings

# the demo's extractor: cheaper than the defaults so the first run trains in minutes on two cores
SAMPLE_RATE, FRAME_SIZE = 2.0, 160
DATASET = ["--seed", "7"]  # the default 120 / 30 / 30 videos of 20-40 s
EPOCHS = 20
HIT_IOU = 0.3  # an event counts as a hit when it overlaps the query's ground truth at least this much


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "cache-dir", "bootstrap-servers", "broker-port")
    parser.add_argument("--video", type=int, default=0, help="which held-out test video to stream")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model is cached")


def prepare(cache: Path, retrain: bool = False) -> tuple[Path, int]:
    """Dataset, features, checkpoint and threshold, each made once and then reused; returns (checkpoint, threshold)."""
    from workers import cli

    data, features, model = cache / "data", cache / "features", cache / "model"
    extractor = ["--sample-rate", str(SAMPLE_RATE), "--frame-size", str(FRAME_SIZE)]
    _step("rendering the synthetic dataset", cli.main(["synth", "--out", str(data), *DATASET]))
    _step("extracting features", cli.main(["extract", str(data / "videos"), "--out", str(features), *extractor]))
    trained = cache / "trained.json"  # written once training has run all its epochs
    if retrain or not trained.is_file():
        from pipeline.training.train import state_path

        resume = ["--resume"] if state_path(model).is_file() and not retrain else []
        _step("training the lite model", cli.main([
            "train", "--dataset", f"activitynet:{data / 'train.json'}", "--features", str(features),
            "--out", str(model), "--preset", "lite", "--epochs", str(EPOCHS), *resume]))
        (cache / "threshold.json").unlink(missing_ok=True)
        trained.write_text(json.dumps({"epochs": EPOCHS}))
    threshold_file = cache / "threshold.json"
    if not threshold_file.is_file():
        threshold_file.write_text(json.dumps({"threshold": calibrate(model, data, features)}))
    return model, json.loads(threshold_file.read_text())["threshold"]


def calibrate(checkpoint: Path, data: Path, features: Path) -> int:
    """The Hamming threshold that best separates, on the validation split, each sentence's nearest candidate inside
    its ground truth (IoU >= 0.5) from its nearest candidate outside it (IoU < 0.1): the rate inside minus twice the
    rate outside, since a standing query that fires on the wrong moment costs its subscriber more than a miss."""
    import numpy as np

    from pipeline.datasets import load_dataset
    from pipeline.features.sentence import SentenceEncoder
    from pipeline.model import load_checkpoint
    from pipeline.training.evaluate import build_samples, score_video
    from pipeline.training.extract import FeatureSet
    from pipeline.spans import ground_truth_iou

    model, _ = load_checkpoint(checkpoint)
    bits = model.config.bits
    samples = build_samples(load_dataset("activitynet", data / "val.json"), FeatureSet.open(features),
                            SentenceEncoder(cache_dir=str(data.parent)).encode, model_device(model))
    inside, outside = [], []
    for sample in samples:
        spans, hashed, _ = score_video(model, sample)
        distance = (bits - hashed) / 2
        iou = ground_truth_iou(spans, sample.ground_truth)
        inside += np.where(iou >= 0.5, distance, np.inf).min(axis=1).tolist()
        outside += np.where(iou < 0.1, distance, np.inf).min(axis=1).tolist()
    inside, outside = np.asarray(inside), np.asarray(outside)
    thresholds = np.arange(bits // 2)
    j = (inside[None] <= thresholds[:, None]).mean(1) - 2 * (outside[None] <= thresholds[:, None]).mean(1)
    return int(thresholds[np.argmax(j)])


def model_device(model):
    return next(model.parameters()).device


def run(args: argparse.Namespace) -> int:
    from pipeline.client import Client
    from pipeline.datasets import load_dataset
    from workers.up import start_system, wait_until_consuming

    import logging

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the demo prints its own story; workers log to stderr
    cache = Path(args.cache_dir) / "demo"
    checkpoint, threshold = prepare(cache, args.retrain)
    # held-out videos whose moments do not overlap (each query has one clear answer), the most moments first
    videos = sorted(load_dataset("activitynet", cache / "data" / "test.json"),
                    key=lambda v: (_overlapping(v), -len(v.annotations), v.video_id))
    video = videos[args.video % len(videos)]
    others = [a for v in videos if v is not video for a in v.annotations]
    distractors = random.Random(args.video).sample(others, k=min(2, len(others)))
    print(f"\nstreaming held-out video {video.video_id} ({video.duration:.0f} s) in real time; "
          f"match threshold {threshold} bits")
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    up_args = argparse.Namespace(sources=[], realtime=True, loop=False, checkpoint=str(checkpoint),
                                 bootstrap_servers=args.bootstrap_servers, broker_port=args.broker_port,
                                 topic_prefix=prefix, metrics_port=0, cache_dir=args.cache_dir)
    os.environ.update(VMH_SAMPLE_RATE=str(SAMPLE_RATE), VMH_FRAME_SIZE=str(FRAME_SIZE), VMH_LOG_LEVEL="ERROR")
    system, bootstrap, own_broker = start_system(up_args, checkpoint)
    try:
        client = Client(bootstrap, prefix)
        queries = {}
        for i, annotation in enumerate(video.annotations):
            queries[client.add_query(annotation.sentence, query_id=f"q{i}", threshold=threshold)] = annotation
        for i, annotation in enumerate(distractors):
            queries[client.add_query(annotation.sentence, query_id=f"absent{i}", threshold=threshold)] = None
        for query_id, annotation in queries.items():
            truth = "not in this video" if annotation is None else _spans(annotation.spans)
            text = (annotation or distractors[int(query_id.removeprefix("absent"))]).sentence
            print(f"  query {query_id}: {text!r} ({truth})")
        subscription = client.subscribe(from_beginning=True)
        wait_until_consuming(bootstrap, [f"{prefix}-encoder", f"{prefix}-query"])
        producer = system.start("producer", "producer", f"{video.video_id}={cache / 'data' / 'videos' / video.video_id}.mp4",
                                "--realtime")
        summary = _follow(subscription, producer, queries, video.duration)
        subscription.close()
    finally:
        system.stop()
        if own_broker:
            from pipeline.bus.broker import stop_broker

            stop_broker(args.broker_port, cache_dir=args.cache_dir)
    _summarise(summary, queries)
    return 0


def _follow(subscription, producer, queries, duration: float) -> dict[str, list[tuple]]:
    """Print match events as they come until the stream has ended and the workers have caught up."""
    from pipeline.spans import temporal_iou
    import numpy as np

    seen: dict[str, list[tuple]] = {query_id: [] for query_id in queries}
    deadline = time.monotonic() + duration + 120
    ended_at = None
    while time.monotonic() < deadline:
        for event in subscription.poll(0.5):
            annotation = queries.get(event.query_id, "unknown")
            if annotation == "unknown":
                continue
            iou = 0.0 if annotation is None else float(
                temporal_iou(np.array([[event.start, event.end]], float), np.asarray(annotation.spans, float)).max())
            hit = iou >= HIT_IOU
            seen[event.query_id].append((event.start, event.end, hit))
            print(f"  {'HIT ' if hit else 'MISS'} {event.query_id}: {event.start}-{event.end} s, distance "
                  f"{event.distance}, IoU {iou:.2f}, {event.latency:.1f} s after capture")
        if producer.poll() is not None and ended_at is None:
            ended_at = time.monotonic()
        if ended_at is not None and time.monotonic() - ended_at > 15:
            break
    return seen


def _summarise(seen: dict[str, list[tuple]], queries) -> None:
    present = [q for q, a in queries.items() if a is not None]
    found = [q for q in present if any(hit for *_, hit in seen[q])]
    false = sum(1 for q in queries for *_, hit in seen[q] if not hit)
    print(f"\nsummary: {len(found)} of {len(present)} moments in the video found "
          f"({', '.join(found) or 'none'}); {false} events off the ground truth; "
          f"{sum(bool(seen[q]) for q, a in queries.items() if a is None)} of "
          f"{sum(a is None for a in queries.values())} absent queries matched")


def _overlapping(video) -> bool:
    spans = sorted(span for annotation in video.annotations for span in annotation.spans)
    return any(start < previous_end for (_, previous_end), (start, _) in zip(spans, spans[1:]))


def _spans(spans) -> str:
    return ", ".join(f"{s:.0f}-{e:.0f} s" for s, e in spans)


def _step(what: str, code: int) -> None:
    if code:
        raise SystemExit(f"vmh demo: {what} failed (exit code {code})")
