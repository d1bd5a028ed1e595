"""`e2e`: how many live 720p streams this machine carries through broker and workers with p99 latency under 2 s.

Ours: N copies of the looped 720p clip paced in real time (`vmh producer --realtime --loop`) through a real broker,
the encoder and the query worker, with one standing query that matches every moment; latency is match publish time
minus the capture time of the moment's last second, over the events of the steady part of each run. N grows until
p99 passes the bound. The hit merger runs with settle 0, so an event leaves one second after its moment is final
(when the next second arrives): that second is in every figure. Reference: the decode-only capacity of the same
machine, the number of such streams a bare PyAV decode loop keeps up with in real time. Unlike the other benchmarks
this is not an interleaved timing of two callables but a capacity search, so it reports its own table.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

NAME = "e2e"
TITLE = "live 720p streams through broker and workers with p99 capture-to-match latency under the bound"
REFERENCE = "decode-only capacity: real-time 720p streams a bare PyAV decode loop sustains on the same machine"
UNIT = "streams"
TARGET = 0.25  # a quarter of what decoding alone allows, with the CNN, encoder, matcher and broker on the same cores
REPEATS = 1
WARMUP = 0


STREAM_COUNTS = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True)
class Params:
    seconds: float = field(default=30.0, metadata={"help": "run time per stream count"})
    steady_after: float = field(default=12.0, metadata={"help": "events of the first seconds of a run are not counted"})
    bound: float = field(default=2.0, metadata={"help": "p99 latency bound in seconds"})
    max_streams: int = field(default=8, metadata={"help": "largest stream count tried"})
    sample_rate: float = field(default=2.0, metadata={"help": "frames sampled per second of each stream"})
    frame_size: int = field(default=160, metadata={"help": "CNN input size"})


def decode_capacity(path: str, frames: int, fps: float) -> tuple[float, float]:
    """(streams, decoded frames/s): how many real-time streams of this file one bare PyAV loop keeps up with."""
    import av

    started = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = sum(1 for _ in container.decode(stream))
    rate = decoded / (time.perf_counter() - started)
    assert decoded == frames, f"decoded {decoded} frames, the file has {frames}"
    return rate / fps, rate


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


def _lite_checkpoint(path: Path, params: Params) -> Path:
    """A lite CMHN with seeded random weights: the timing does not depend on training."""
    import torch

    from pipeline.features.backbone import FrameEncoder
    from pipeline.features.sentence import MODEL_NAME
    from pipeline.model import build_cmhn, save_checkpoint

    torch.manual_seed(0)
    extractor = FrameEncoder(frame_size=params.frame_size, sample_rate=params.sample_rate, device="cpu").identity()
    return save_checkpoint(path, build_cmhn("lite"), extractor, MODEL_NAME)


def _run_streams(n: int, video: str, env: dict, params: Params, prefix: str, tmp: Path, workers) -> dict:
    """N paced streams for ``params.seconds``; latency percentiles of the steady part, CPU and memory per stream."""
    import psutil

    from pipeline.bus.kafka import read_committed_consumer
    from pipeline.bus.records import MatchEvent, MomentCode, decode
    from pipeline.bus.topics import topics

    names = topics(prefix)
    matches = read_committed_consumer([names.matches, names.moments], from_beginning=False,
                                      bootstrap=env["VMH_BOOTSTRAP_SERVERS"])
    for tp in matches.assignment():
        matches.position(tp)
    ids = [f"n{n}-{i}" for i in range(n)]
    producer = _spawn(["producer", *[f"{i}={video}" for i in ids], "--realtime", "--loop"], env, tmp / f"producer{n}.log")
    processes = [psutil.Process(p.pid) for p in (producer, *workers)]
    for p in processes:
        p.cpu_percent()
    started = time.time()
    latencies, to_moment, rss = [], [], []
    try:
        while time.time() - started < params.seconds:
            for tp, batch in matches.poll(timeout_ms=500).items():
                for record in batch:
                    if tp.topic == names.moments:
                        moment = decode(record.value, MomentCode)
                        if moment.stream_id in ids and moment.capture_time >= started + params.steady_after:
                            to_moment.append(moment.emitted_time - moment.capture_time)
                        continue
                    event = decode(record.value, MatchEvent)
                    if event.stream_id in ids and event.capture_time >= started + params.steady_after:
                        latencies.append(event.match_time - event.capture_time)
            rss.append(sum(p.memory_info().rss for p in processes))
        cpu = sum(p.cpu_percent() for p in processes) / 100.0
    finally:
        producer.terminate()
        producer.wait(30)
        matches.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("inf")
    return {"streams": n, "events": len(latencies), "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": p99, "capture_to_moment_p50_s": statistics.median(to_moment) if to_moment else None,
            "cpu_cores_per_stream": cpu / n, "rss_mb_per_stream": statistics.median(rss) / n / 2**20}


def measure(params: Params) -> dict:
    from pipeline.bus.broker import ensure_broker, free_port_pair, stop_broker
    from pipeline.bus.topics import create_topics
    from workers.bench.decode import bigbuckbunny, looped
    from workers.bench.runner import machine

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmh-e2e-")))
        video = str(tmp / "bbb-720p.mp4")
        frames, duration = looped(bigbuckbunny(), 20.0, video)
        capacity, decode_fps = decode_capacity(video, frames, frames / duration)
        prefix = f"e2e-{uuid.uuid4().hex[:6]}"
        bootstrap = os.environ.get("VMH_BOOTSTRAP_SERVERS")
        if not bootstrap:
            port = free_port_pair()
            bootstrap = ensure_broker(port, data_dir=tmp / "kafka")
            stack.callback(stop_broker, port)
        create_topics(bootstrap, prefix=prefix, partitions=4)
        checkpoint = _lite_checkpoint(tmp / "lite", params)
        env = dict(os.environ, VMH_BOOTSTRAP_SERVERS=bootstrap, VMH_TOPIC_PREFIX=prefix, VMH_CHECKPOINT=str(checkpoint),
                   VMH_SAMPLE_RATE=str(params.sample_rate), VMH_FRAME_SIZE=str(params.frame_size),
                   VMH_LOG_LEVEL="ERROR")
        workers = [_spawn(["encoder", "--instance", "e2e"], env, tmp / "encoder.log"),
                   _spawn(["query-worker", "--instance", "e2e", "--settle", "0"], env, tmp / "query.log")]
        for worker in workers:
            stack.callback(worker.wait, 30)
            stack.callback(worker.terminate)
        from pipeline.client import Client

        Client(bootstrap, prefix).add_query(code=bytes(16), query_id="everything", threshold=128)
        runs, best = [], 0
        for n in [n for n in STREAM_COUNTS if n <= params.max_streams]:
            run = _run_streams(n, video, env, params, prefix, tmp, workers)
            runs.append(run)
            if run["p99_s"] >= params.bound or not run["events"]:
                break
            best = n
        ratio = best / capacity if capacity else 0.0
    return {
        "name": NAME, "ratio": round(ratio, 3), "reference": REFERENCE, "unit": UNIT, "target": TARGET,
        "median_ours": best, "median_reference": round(capacity, 2),
        "decode_fps_720p": round(decode_fps, 1), "runs": runs, "params": asdict(params), "machine": machine(),
        "check": {"passed": all(r["events"] for r in runs[:1]), "problems": [] if runs and runs[0]["events"] else
                  ["no match events came through for a single stream"]},
    }


def table(result: dict) -> str:
    lines = [TITLE, f"reference: {result['reference']}",
             f"decode-only capacity: {result['median_reference']} streams ({result['decode_fps_720p']} frames/s)",
             "streams  events  p50 (s)  p99 (s)  CPU cores/stream  RSS MB/stream"]
    for run in result["runs"]:
        p50 = f"{run['p50_s']:.2f}" if run["p50_s"] is not None else "-"
        lines.append(f"{run['streams']:>7}  {run['events']:>6}  {p50:>7}  {run['p99_s']:>7.2f}  "
                     f"{run['cpu_cores_per_stream']:>16.2f}  {run['rss_mb_per_stream']:>13.0f}")
    lines.append(f"largest N with p99 < {result['params']['bound']} s: {result['median_ours']}; "
                 f"ratio to decode-only capacity {result['ratio']} (target {result['target']})")
    return "\n".join(lines)
