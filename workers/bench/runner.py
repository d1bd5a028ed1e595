"""What every benchmark shares: interleaved timing, medians, the correctness check, the machine, the report.

A benchmark is a list of ``Case``: our callable and the reference's, doing the same work. The machine is shared
and noisy, so the two run in the same process, interleaved (their order alternating every repeat), after warm-up
calls that are checked but not timed; throughput is the median over the timed repeats. Every call's output, warm-up
included, goes through the case's check, so a fast but wrong path shows as a failed check, not as a good ratio.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable


@dataclass(frozen=True)
class Verdict:
    """What a check found in one (ours, reference) pair: problems (empty when they agree) and tallies."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One timed comparison. ``work`` is how many units (the benchmark's unit) one call of either side does;
    ``amounts`` names other quantities in one call's output (e.g. matches), reported per second; ``notes`` holds
    settings the benchmark derived (a radius, a file's length) for the report."""

    label: str
    ours: Callable[[], Any]
    reference: Callable[[], Any]
    work: float
    check: Callable[[Any, Any], Verdict]
    amounts: Callable[[Any], dict[str, float]] = lambda out: {}
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measured:
    case: Case
    seconds: dict[str, list[float]]  # side ("ours", "reference") -> wall-clock seconds of each timed call
    cpu: dict[str, list[float]]  # side -> this process's CPU seconds (all threads) of each timed call
    problems: list[str]
    counts: dict[str, int]
    amounts: dict[str, float]


def measure(case: Case, repeats: int, warmup: int) -> Measured:
    """Call both sides ``warmup + repeats`` times, interleaved, and check every pair of outputs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sides = ("ours", "reference")
    timed: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    problems: list[str] = []
    counts: dict[str, int] = {}
    amounts: dict[str, float] = {}
    for i in range(warmup + repeats):
        outputs, seconds, cpu_seconds = {}, {}, {}
        for side in sides if i % 2 == 0 else sides[::-1]:
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[side] = getattr(case, side)()
            seconds[side] = time.perf_counter() - started
            cpu_seconds[side] = time.process_time() - cpu_started
        if i >= warmup:
            for side in sides:
                timed[side].append(seconds[side])
                cpu[side].append(cpu_seconds[side])
        verdict = case.check(outputs["ours"], outputs["reference"])
        problems += [f"call {i + 1}: {p}" for p in verdict.problems]
        for name, n in verdict.counts.items():
            counts[name] = counts.get(name, 0) + n
        amounts = case.amounts(outputs["ours"])
    return Measured(case, timed, cpu, problems, counts, amounts)


def run_benchmark(bench: ModuleType, params: Any, repeats: int | None = None, warmup: int | None = None) -> dict:
    """Build a benchmark's cases from ``params``, measure each, and return the report; resources the cases hold
    (temporary files, a broker) are released before returning."""
    repeats = bench.REPEATS if repeats is None else repeats
    warmup = bench.WARMUP if warmup is None else warmup
    with ExitStack() as stack:
        measured = [measure(case, repeats, warmup) for case in bench.cases(params, stack)]
        result = report(bench.NAME, bench.REFERENCE, bench.UNIT, bench.TARGET, dataclasses.asdict(params), measured,
                        repeats, warmup)
    return result


def machine() -> dict[str, Any]:
    """Cores, CPU model and SIMD flags, torch threads and load: what the figures depend on."""
    import torch

    from pipeline.device import cpu_flags

    cpu = cpu_flags()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu["cpu"] if cpu["cpu"] != "unknown" else platform.processor() or "unknown",
        "cpu_flags": cpu["simd"],
        "torch_cpu_capability": cpu["torch_capability"],
        "faiss_simd": cpu["faiss_simd"],
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def report(
    name: str, reference: str, unit: str, target: float, params: dict, measured: list[Measured], repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """The JSON result. With several cases the headline figures are the worst case's: it is what meets the target
    or not."""
    cases = [_case_report(m, unit) for m in measured]
    worst = min(cases, key=lambda c: c["ratio"])
    problems = [f"{c['case']}: {p}" for c in cases for p in c["check"]["problems"]]
    return {
        "name": name,
        "ratio": worst["ratio"],
        "reference": reference,
        "median_ours": worst["median_ours"],
        "median_reference": worst["median_reference"],
        "unit": unit,
        "worst_case": worst["case"],
        "target": target,
        "meets_target": worst["ratio"] >= target,
        "check": {"passed": not problems, "problems": problems[:20]},
        "params": params,
        "repeats": repeats,
        "warmup": warmup,
        "machine": machine(),
        "cases": cases,
    }


def _case_report(m: Measured, unit: str) -> dict[str, Any]:
    work = m.case.work
    ours = statistics.median(work / s for s in m.seconds["ours"])
    theirs = statistics.median(work / s for s in m.seconds["reference"])
    return {
        "case": m.case.label,
        "ratio": ours / theirs,
        "median_ours": ours,
        "median_reference": theirs,
        "unit": unit,
        "us_per_unit": {"ours": 1e6 / ours, "reference": 1e6 / theirs},  # microseconds per unit of work
        "seconds_ours": m.seconds["ours"],
        "seconds_reference": m.seconds["reference"],
        # CPU time is less sensitive to other processes on a shared machine than wall time; > 1: ours uses less
        "cpu_ratio": statistics.median(m.cpu["reference"]) / max(statistics.median(m.cpu["ours"]), 1e-9),
        "work_per_call": work,
        "notes": m.case.notes,
        "rates_ours": {f"{k}/s": v / statistics.median(m.seconds["ours"]) for k, v in m.amounts.items()},
        "check": {"passed": not m.problems, "problems": m.problems[:20], "counts": m.counts},
    }


def table(result: dict[str, Any], title: str) -> str:
    """The result for people: one row per case, then the check and the machine."""
    unit = result["unit"]
    rows = [("case", f"ours ({unit})", f"reference ({unit})", "ratio", "cpu ratio", "spread ours", "spread ref",
             "check")]
    for c in result["cases"]:
        rows.append((
            c["case"], _num(c["median_ours"]), _num(c["median_reference"]), f"{c['ratio']:.2f}",
            f"{c['cpu_ratio']:.2f}",
            _spread(c["seconds_ours"]), _spread(c["seconds_reference"]), "ok" if c["check"]["passed"] else "FAILED",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{result['name']}: {title}", f"reference: {result['reference']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    verdict = "meets" if result["meets_target"] else "MISSES"
    lines.append(f"ratio {result['ratio']:.2f} (worst case {result['worst_case']}) {verdict} the target >= "
                 f"{result['target']:g}")
    for c in result["cases"]:
        extra = [f"{k} {_num(v)}" for k, v in c["rates_ours"].items()]
        extra += [f"{k} {v}" for k, v in c["check"]["counts"].items()]
        if extra:
            lines.append(f"  {c['case']}: " + ", ".join(extra))
    lines += [f"  check: {p}" for p in result["check"]["problems"]]
    m = result["machine"]
    lines.append(f"machine: {m['cores']} cores, {m['cpu']} ({' '.join(m['cpu_flags'])}; torch "
                 f"{m['torch_cpu_capability']}, faiss {m['faiss_simd']}), torch threads {m['torch_threads']}, "
                 f"load {m['load_average']}; "
                 f"{result['repeats']} timed repeats after {result['warmup']} warm-up")
    lines.append("params: " + ", ".join(f"{k}={v}" for k, v in result["params"].items()))
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _spread(seconds: list[float]) -> str:
    """Fastest and slowest call relative to the median: how noisy the runs were."""
    mid = statistics.median(seconds)
    return f"{min(seconds) / mid - 1:+.0%}/{max(seconds) / mid - 1:+.0%}"
