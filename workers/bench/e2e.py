"""`e2e`: how many live 720p streams this machine carries through broker and workers with p99 latency under 2 s.

Ours: N copies of the looped 720p clip paced in real time (`vmh producer --realtime --loop`), spread over producer
processes as a deployment spreads them (one per core by default), through a real broker, the encoder and the query
worker, with one standing query that matches every moment; the frame path is the published model's (its
extractor as its config records it: MobileNetV2 at 160 px with a 2 x 2 grid, 2 fps, Y, U and V optical flow), the
lite model's weights random; latency is match
publish time minus the capture time of the moment's last second, over the events of the steady part of each run;
the producer's part of it (capture to the feature record's send) is reported beside it. N doubles until a run misses the bound,
then bisects: no ceiling. A run is within capacity when p99 is under the bound, every stream had events and the
producers dropped nothing (they shed load rather than fall behind, so past capacity latency stays bounded and the
dropped seconds say what it cost). The hit merger runs with settle 0, so an event leaves one second after its
moment is final (when the next second arrives): that second is in every figure.

Where the CPU goes, over the steady part of each run: per thread of every process (``/proc/PID/task``): a
producer's decode threads (which name themselves, and the codec threads they start inherit the name), its Kafka
network thread, and its main thread split by the producer's own per-stage CPU counters (CNN and pooling, publishing);
the encoder, query worker and broker processes whole. Reference: the decode-only capacity of the same machine, the
number of such streams a bare PyAV decode loop keeps up with in real time, measured before and after the search.
Unlike the other benchmarks this is not an interleaved timing of two callables but a capacity search, so it reports
its own table. ``--soak S`` then runs twice the capacity found (or ``--soak-streams``) for S seconds and checks that
latency stays bounded, drops are counted and every worker's memory stays flat after the first minute.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.weights import published_checkpoint, published_extractor
from workers.up import spread

NAME = "e2e"
TITLE = "live 720p streams through broker and workers with p99 capture-to-match latency under the bound"
REFERENCE = "decode-only capacity: real-time 720p streams a bare PyAV decode loop sustains on the same machine"
UNIT = "streams"
TARGET = 0.75  # of what decoding alone allows, with the CNN, encoder, matcher and broker on the same cores
REPEATS = 1
WARMUP = 0
STAGES = ("decode", "cnn", "kafka clients", "encoder", "matcher", "broker", "other")
# the frame path users get: the published model's extractor, read from its config when a run starts (the weights
# stay random); these values of the frame-path parameters mean "the published model's"
_FROM_PUBLISHED = {"sample_rate": 0.0, "frame_size": 0, "spatial_grid": 0, "motion_grid": -1, "motion_planes": "",
                   "motion_expansion": ""}


@dataclass(frozen=True)
class Params:
    seconds: float = field(default=30.0, metadata={"help": "measured seconds per stream count"})
    steady_after: float = field(default=5.0, metadata={"help": "seconds after every stream's first moment before "
                                                                "measuring (warm-up)"})
    startup: float = field(default=90.0, metadata={"help": "seconds the workers may take to start; measuring begins "
                                                          "then even if some streams never came up"})
    bound: float = field(default=2.0, metadata={"help": "p99 latency bound in seconds"})
    budget: float = field(default=420.0, metadata={"help": "seconds the capacity search may take; it reports the "
                                                             "largest count within the bound found by then"})
    producers: int = field(default=0, metadata={"help": "producer processes the streams are spread over; 0: one "
                                                        "per core (fewer when there are fewer streams)"})
    sample_rate: float = field(default=0.0, metadata={"help": "frames sampled per second of each stream (0: the "
                                                              "published model's)"})
    frame_size: int = field(default=0, metadata={"help": "CNN input size (0: the published model's)"})
    spatial_grid: int = field(default=0, metadata={"help": "cells a side of the CNN feature map also pooled (0: the "
                                                           "published model's)"})
    motion_grid: int = field(default=-1, metadata={"help": "cells a side of the optical-flow features (0: none; -1: "
                                                           "the published model's)"})
    motion_planes: str = field(default="", metadata={"help": "planes the flow is taken on, yuv or y (empty: the "
                                                             "published model's)"})
    motion_expansion: str = field(default="", metadata={"help": "how a motion cell measures growing (empty: the "
                                                                "published model's)"})
    soak: float = field(default=0.0, metadata={"help": "then run an overload soak this many seconds (0: none)"})
    soak_streams: int = field(default=0, metadata={"help": "streams of the soak, skipping the search; 0: twice the "
                                                           "capacity found"})


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


def next_count(passed: int, failed: int | None, tried: int) -> int | None:
    """The next stream count of the search after ``tried``: double while every run passes, then bisect between the
    largest count that passed and the smallest that failed; None when they are adjacent."""
    if failed is None:
        return 2 * tried
    middle = (passed + failed) // 2
    return middle if middle > passed else None


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


def with_published_frame_path(params: Params) -> Params:
    """``params`` with every frame-path parameter left unset taken from the published model's extractor."""
    published = published_extractor()
    return replace(params, **{name: published[name] for name, unset in _FROM_PUBLISHED.items()
                              if getattr(params, name) == unset})


def _lite_checkpoint(path: Path, params: Params) -> Path:
    """A lite CMHN with seeded random weights over the frame path of ``params`` (``with_published_frame_path``),
    with as many members as the published model: the timing does not depend on training, and random codes keep the
    match-everything query's events coming (a trained model's codes of one steady scene merge into one endless hit
    cluster)."""
    import torch

    from pipeline.features.backbone import FrameEncoder
    from pipeline.features.sentence import MODEL_NAME
    from pipeline.model import build_cmhn, ensemble, save_checkpoint

    count = json.loads((published_checkpoint() / "config.json").read_text()).get("members", 1)
    torch.manual_seed(0)
    frames = FrameEncoder(frame_size=params.frame_size, sample_rate=params.sample_rate, device="cpu",
                          spatial_grid=params.spatial_grid, motion_grid=params.motion_grid,
                          motion_planes=params.motion_planes, motion_expansion=params.motion_expansion)
    members = [build_cmhn("lite", video_dim=frames.dim, motion_dim=frames.motion_dim) for _ in range(count)]
    return save_checkpoint(path, ensemble(members) if len(members) > 1 else members[0], frames.identity(), MODEL_NAME)


def _match_everything(checkpoint: Path) -> tuple[bytes, int]:
    """A standing query every moment of the checkpoint's model matches: a code of its length at the largest
    distance (a code of another length is refused by the query worker, and then nothing matches)."""
    bits = json.loads((checkpoint / "config.json").read_text())["bits"]
    return bytes(bits // 8), bits


def _cpu(pid: int) -> tuple[float, dict[str, float]]:
    """CPU seconds of process ``pid`` so far (ended threads included) and of each live thread, by "tid name"."""
    ticks = os.sysconf("SC_CLK_TCK")

    def seconds(stat: str) -> float:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            threads[f"{tid} {name}"] = seconds(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except OSError:
            continue  # the thread ended
    return seconds(Path(f"/proc/{pid}/stat").read_text()), threads


def _scrape(port: int) -> dict[str, float]:
    """Each metric of a worker's /metrics summed over its label sets, but per-stage CPU kept per stage."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = f"{sample.name}:{sample.labels['stage']}" if sample.name == STAGE_CPU else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


STAGE_CPU = "vmh_stage_cpu_seconds_total"


class _Workers:
    """The processes of one run: where their CPU went and how much memory they hold."""

    def __init__(self, producers: list[tuple[subprocess.Popen, int]], encoder: int, query: int,
                 broker: int | None) -> None:
        self.producers = producers
        self.pids = {"encoder": encoder, "query worker": query, **({"broker": broker} if broker else {})}
        for i, (process, _) in enumerate(producers):
            self.pids[f"producer {i}"] = process.pid

    def snapshot(self) -> dict:
        return {"cpu": {name: _cpu(pid) for name, pid in self.pids.items()},
                "metrics": [_scrape(port) for _, port in self.producers],
                "rss_mb": {name: _rss_mb(pid) for name, pid in self.pids.items()}, "time": time.monotonic()}

    @staticmethod
    def stages(first: dict, last: dict) -> dict[str, float]:
        """Cores used per stage between two snapshots. A producer's decode threads come and go (a looped file
        reopens its codec), so decode is what the process used less its threads that stay: the main thread, split by
        the producer's own per-stage counters, and the Kafka network thread."""
        seconds = last["time"] - first["time"]
        cores = dict.fromkeys(STAGES, 0.0)
        for worker, (total, threads) in last["cpu"].items():
            used = total - first["cpu"][worker][0]
            if not worker.startswith("producer"):
                cores[{"encoder": "encoder", "query worker": "matcher", "broker": "broker"}[worker]] += used
                continue
            before = first["cpu"][worker][1]
            for thread, cpu in threads.items():
                name = thread.split(" ", 1)[1]
                if thread in before and not name.startswith(("decode", "av:")):  # FFmpeg's threads: av:<codec>:...
                    stage = "kafka clients" if name.startswith("kafka") else "other"
                    cores[stage] += cpu - before[thread]
                    used -= cpu - before[thread]
            cores["decode"] += used
        for after, before in zip(last["metrics"], first["metrics"]):
            features, publish = (after.get(f"{STAGE_CPU}:{stage}", 0.0) - before.get(f"{STAGE_CPU}:{stage}", 0.0)
                                 for stage in ("features", "publish"))
            cores["cnn"] += features
            cores["kafka clients"] += publish
            cores["other"] -= features + publish
        return {stage: round(max(0.0, value) / seconds, 3) for stage, value in cores.items()}


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_streams(n: int, seconds: float, video: str, env: dict, params: Params, prefix: str, tmp: Path,
                 workers: list[subprocess.Popen], broker: int | None, memory_after: float | None = None) -> dict:
    """N paced streams, measured for ``seconds`` once every stream gives moments: latency percentiles, CPU per stage,
    memory per worker. With ``memory_after``, also each worker's RSS that many seconds in, for the soak's check."""
    from pipeline.bus.kafka import read_committed_consumer
    from pipeline.bus.records import FrameFeatures, MatchEvent, MomentCode, decode
    from pipeline.bus.topics import topics

    names = topics(prefix)
    matches = read_committed_consumer([names.matches, names.moments, names.features], from_beginning=False,
                                      bootstrap=env["VMH_BOOTSTRAP_SERVERS"])
    for tp in matches.assignment():
        matches.position(tp)
    ids = [f"n{n}-{i}" for i in range(n)]
    producers = []
    for p, streams in enumerate(spread([f"{i}={video}" for i in ids], params.producers)):
        port = _free_port()
        producers.append((_spawn(["producer", *streams, "--realtime", "--loop", "--metrics-port", str(port)], env,
                                 tmp / f"producer{n}-{p}.log"), port))
    watched = _Workers(producers, workers[0].pid, workers[1].pid, broker)
    started = time.time()
    latencies, to_moment, to_features, up, streams_seen = [], [], [], set(), set()
    steady = first = early = None  # wall-clock start of the measured part, and the snapshots
    try:
        while steady is None or time.time() < steady + seconds:
            now = time.time()
            if steady is None and (len(up) == n or now > started + params.startup):
                steady = now + params.steady_after
            if first is None and steady is not None and now >= steady:
                first = watched.snapshot()
            if memory_after is not None and early is None and steady is not None and now >= steady + memory_after:
                early = watched.snapshot()
            for tp, batch in matches.poll(timeout_ms=500).items():
                for record in batch:
                    if tp.topic == names.features:  # the producer's part: capture to the record's send
                        features = decode(record.value, FrameFeatures)
                        if steady is not None and features.stream_id in ids and features.capture_time >= steady:
                            to_features.append(record.timestamp / 1000 - features.capture_time)
                        continue
                    if tp.topic == names.moments:
                        moment = decode(record.value, MomentCode)
                        if moment.stream_id not in ids:
                            continue
                        up.add(moment.stream_id)
                        if steady is not None and moment.capture_time >= steady:
                            to_moment.append(moment.emitted_time - moment.capture_time)
                        continue
                    event = decode(record.value, MatchEvent)
                    if steady is not None and event.stream_id in ids and event.capture_time >= steady:
                        latencies.append(event.match_time - event.capture_time)
                        streams_seen.add(event.stream_id)
        last = watched.snapshot()
    finally:
        for process, _ in producers:
            process.terminate()
        for process, _ in producers:
            process.wait(30)
        matches.close()
    dropped = sum(m.get("vmh_dropped_seconds_total", 0.0) for m in last["metrics"]) - sum(
        m.get("vmh_dropped_seconds_total", 0.0) for m in first["metrics"])  # in the measured part only
    producer_rss = [last["rss_mb"][f"producer {p}"] for p in range(count)]
    result = {
        "streams": n, "producers": count, "events": len(latencies), "streams_with_events": len(streams_seen),
        "p50_s": _percentile(latencies, 0.5), "p99_s": _percentile(latencies, 0.99),
        "capture_to_moment_p50_s": _percentile(to_moment, 0.5), "capture_to_moment_p99_s": _percentile(to_moment, 0.99),
        "capture_to_features_p50_s": _percentile(to_features, 0.5),
        "capture_to_features_p99_s": _percentile(to_features, 0.99),
        "dropped_seconds": round(dropped, 1),
        "cores": _Workers.stages(first, last) if first else {},
        "rss_mb": {name: round(mb) for name, mb in last["rss_mb"].items()},
        "rss_mb_per_stream": round(sum(producer_rss) / n, 1),
    }
    result["cpu_cores_per_stream"] = round(sum(result["cores"].values()) / n, 3) if first else None
    if early is not None:
        result["rss_mb_after_first_window"] = {name: round(mb) for name, mb in early["rss_mb"].items()}
    return result


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _within(run: dict, params: Params) -> bool:
    return (run["events"] > 0 and run["p99_s"] is not None and run["p99_s"] <= params.bound and
            run["streams_with_events"] == run["streams"] and run["dropped_seconds"] == 0)


def measure(params: Params) -> dict:
    from pipeline.bus.broker import broker_status, ensure_broker, free_port_pair, stop_broker
    from pipeline.bus.topics import create_topics
    from pipeline.client import Client
    from workers.bench.decode import bigbuckbunny, looped
    from workers.bench.runner import machine

    params = with_published_frame_path(params)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmh-e2e-")))
        video = str(tmp / "bbb-720p.mp4")
        frames, duration = looped(bigbuckbunny(), 20.0, video)
        decode_runs = [decode_capacity(video, frames, frames / duration) for _ in range(3)]
        prefix = f"e2e-{uuid.uuid4().hex[:6]}"
        bootstrap, broker = os.environ.get("VMH_BOOTSTRAP_SERVERS"), None
        if not bootstrap:
            port = free_port_pair()
            bootstrap = ensure_broker(port, data_dir=tmp / "kafka")
            broker = broker_status(port).pid
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
        code, threshold = _match_everything(checkpoint)
        Client(bootstrap, prefix).add_query(code=code, query_id="everything", threshold=threshold)
        capacity = statistics.median(streams for streams, _ in decode_runs)
        runs, best, failed = [], 0, None
        searching_until = time.monotonic() + params.budget
        n: int | None = 0 if params.soak_streams else max(1, round(capacity / 2))
        while n and time.monotonic() < searching_until:
            for _ in range(2):  # a count that fails is tried once more: one pause of a shared machine is no limit
                run = _run_streams(n, params.seconds, video, env, params, prefix, tmp, workers, broker)
                run["within_bound"] = _within(run, params)
                runs.append(run)
                if run["within_bound"] or time.monotonic() >= searching_until:
                    break
            if run["within_bound"]:
                best = n
            else:
                failed = n
            n = next_count(best, failed, n)
        soak = None
        if params.soak:
            streams = params.soak_streams or 2 * max(best, 1)
            soak = _run_streams(streams, params.soak, video, env, params, prefix, tmp, workers, broker,
                                memory_after=min(60.0, params.soak / 2))  # the first minute, in a long soak
            soak["rss_growth"] = {name: round(mb / soak["rss_mb_after_first_window"][name] - 1, 3)
                                  for name, mb in soak["rss_mb"].items() if soak["rss_mb_after_first_window"].get(name)}
        decode_runs += [decode_capacity(video, frames, frames / duration) for _ in range(3)]
        capacity = statistics.median(streams for streams, _ in decode_runs)
        decode_fps = statistics.median(fps for _, fps in decode_runs)
    ratio = best / capacity if capacity else 0.0
    problems = [] if not runs or runs[0]["events"] else ["no match events came through"]
    return {
        "name": NAME, "ratio": round(ratio, 3), "reference": REFERENCE, "unit": UNIT, "target": TARGET,
        "meets_target": ratio >= TARGET, "median_ours": best, "median_reference": round(capacity, 2),
        "decode_fps_720p": round(decode_fps, 1), "decode_capacity_runs": [round(s, 2) for s, _ in decode_runs],
        "search_ended": "adjacent counts" if n is None else "budget" if runs else "soak only",
        "runs": runs, "soak": soak, "params": asdict(params), "machine": machine(),
        "check": {"passed": not problems, "problems": problems},
    }


def table(result: dict) -> str:
    lines = [TITLE, f"reference: {result['reference']}",
             f"decode-only capacity: {result['median_reference']} streams ({result['decode_fps_720p']} frames/s, "
             f"median of {len(result['decode_capacity_runs'])} runs before and after the search)",
             "streams  procs  events  p50 (s)  p99 (s)  dropped s  cores/stream  RSS MB/stream  within  cores: "
             + ", ".join(STAGES)]
    for run in result["runs"] + ([result["soak"]] if result["soak"] else []):
        cores = " ".join(f"{run['cores'].get(stage, 0):.2f}" for stage in STAGES)
        per_stream = f"{run['cpu_cores_per_stream']:.3f}" if run["cpu_cores_per_stream"] is not None else "-"
        lines.append(f"{run['streams']:>7}  {run['producers']:>5}  {run['events']:>6}  {_s(run['p50_s']):>7}  "
                     f"{_s(run['p99_s']):>7}  {run['dropped_seconds']:>9}  {per_stream:>12}  "
                     f"{run['rss_mb_per_stream']:>13}  {'yes' if run.get('within_bound') else 'no':>6}  {cores}")
    lines.append(f"largest N with p99 <= {result['params']['bound']} s and nothing dropped: {result['median_ours']}; "
                 f"ratio to decode-only capacity {result['ratio']} (target {result['target']}); search ended: "
                 f"{result['search_ended']}")
    if result["runs"]:
        last = max((r for r in result["runs"] if r.get("within_bound")), key=lambda r: r["streams"], default=None)
        if last:
            lines.append("RSS MB per worker at N=%d: " % last["streams"]
                         + ", ".join(f"{k} {v}" for k, v in last["rss_mb"].items()))
    soak = result["soak"]
    if soak:
        lines.append(f"soak: {soak['streams']} streams for {result['params']['soak']:g} s: capture-to-moment p99 "
                     f"{_s(soak['capture_to_moment_p99_s'])} s (of which capture to feature record "
                     f"{_s(soak['capture_to_features_p99_s'])} s), {soak['dropped_seconds']} s dropped; RSS growth "
                     "after the first minute: " + ", ".join(f"{k} {v:+.1%}" for k, v in soak["rss_growth"].items()))
    m = result["machine"]
    lines.append(f"machine: {m['cores']} cores, {m['cpu']}, load {m['load_average']}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
