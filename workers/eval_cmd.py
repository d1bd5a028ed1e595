"""`vmh eval --checkpoint C --dataset KIND:PATH --features DIR`: recall of a checkpoint, hashed vs continuous vs
chance, and the query side's latency; with ``--alerts``, the quality of the alerts its standing queries raise when
every video of the split streams live at once (pipeline/training/alerts.py). A table by default, JSON with --json."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

from pipeline.settings import add_settings

RANDOM_DRAWS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "checkpoint", "device", "torch-threads", "cache-dir")
    parser.add_argument("--dataset", required=True, help="annotations as KIND:PATH, e.g. activitynet:DIR/test.json")
    parser.add_argument("--features", required=True, help="features directory written by `vmh extract`")
    parser.add_argument("--nms", type=float, default=0.5, help="threshold of the fixed-NMS protocol [%(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-ranking baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--alerts", action="store_true",
                        help="alert quality through the live encoder and matcher instead of ranking recall")
    parser.add_argument("--thresholds", default="",
                        help="Hamming thresholds of the alert sweep as FIRST:LAST:STEP [default: 32 steps up to B/2]")
    parser.add_argument("--settle", type=int, default=3, help="the query worker's settle window, seconds [%(default)s]")
    parser.add_argument("--calibrate", action="store_true",
                        help="with --alerts: first store the threshold of highest alert F1 on this split in the "
                             "checkpoint as its own (give it a validation split, larger than training's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.datasets import load_dataset, parse_dataset_spec
    from pipeline.device import DeviceUnavailable, pick_device
    from pipeline.features.sentence import SentenceEncoder
    from pipeline.model import CheckpointError, load_checkpoint
    from pipeline.model.checkpoint import set_calibration
    from pipeline.training.evaluate import build_samples, evaluate, time_queries
    from pipeline.training.extract import FeatureError, FeatureSet

    # one video, one query at a time: ops too small to gain from threads
    torch.set_num_threads(args.torch_threads or 1)
    try:
        if not args.checkpoint:
            raise ValueError("no checkpoint given (--checkpoint or VMH_CHECKPOINT)")
        if args.calibrate and not args.alerts:
            raise ValueError("--calibrate calibrates the alert threshold: give --alerts too")
        kind, path = parse_dataset_spec(args.dataset)
        device = pick_device(args.device)
        features = FeatureSet.open(args.features)
        sentences = SentenceEncoder(str(device), cache_dir=args.cache_dir)
        model, config = load_checkpoint(
            args.checkpoint,
            extractor=features.extractor,
            sentence_encoder=sentences.identity()["sentence_encoder"],
            map_location=device,
        )
        samples = build_samples(load_dataset(kind, path), features, sentences.encode, device)
        if args.alerts:
            if not config["causal"]:
                raise ValueError("alerts come from the live encoder, which runs the causal form; this checkpoint is "
                                 "bidirectional")
            from pipeline.training.alerts import calibration_of, thresholds_for

            sweep = parse_range(args.thresholds) if args.thresholds else thresholds_for(model.config.bits)
            if args.calibrate:  # one sweep serves both: every threshold calibration would try, and the ones asked
                sweep = sorted({*sweep, *thresholds_for(model.config.bits)})
            report = alert_report(model, config, samples, sweep, args.settle)
            if args.calibrate:
                best = report["best_on_this_split"]
                calibration = calibration_of(best, settle=args.settle, videos=len(samples)) | {"split": args.dataset}
                set_calibration(args.checkpoint, calibration)
                report |= {"threshold": calibration["threshold"], "calibration": calibration, "at_threshold": best}
            report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, **report}
            print(json.dumps(report) if args.json else format_alerts(report))
            return 0
        ious = (0.1, 0.3, 0.5, 0.7) if kind == "tacos" else (0.3, 0.5, 0.7)
        recall = evaluate(model, samples, ious=ious, nms=args.nms, random_draws=RANDOM_DRAWS, seed=args.seed)

        def uncached(texts: list[str]) -> Any:
            return sentences.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)

        timing = time_queries(model, samples, uncached)
    except (ValueError, OSError, DeviceUnavailable, FeatureError, CheckpointError) as e:
        print(f"vmh eval: {e}", file=sys.stderr)
        return 2
    report = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "model": {key: config[key] for key in ("preset", "bits", "causal")},
        "videos": len(samples),
        "queries": sum(len(s.sentences) for s in samples),
        "protocols": {
            f"nms={args.nms:g}": f"fixed NMS threshold {args.nms:g} at every IoU m",
            "nms=m-0.05": "the CMHN reference's NMS, threshold m - 0.05 at IoU m",
        },
        "scorings": {
            "hashed": "B - 2*Hamming of the sign codes, as served",
            "continuous": "dot product of the relaxed codes smooth_sign(MLP output), as trained",
            "random": f"uniform random ranking, mean of {RANDOM_DRAWS} seeded draws",
        },
        **recall,
        "query_ms": timing,
    }
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def parse_range(text: str) -> range:
    """FIRST:LAST:STEP (LAST included) as a range; a bad one is a ValueError naming the flag."""
    try:
        first, last, step = (int(part) for part in text.split(":"))
        if first < 0 or step < 1 or last < first:
            raise ValueError
    except ValueError:
        raise ValueError(f"--thresholds must be FIRST:LAST:STEP with 0 <= FIRST <= LAST and STEP >= 1, got {text!r}")
    return range(first, last + 1, step)


def alert_report(model, config: dict[str, Any], samples, thresholds: Iterable[int], settle: int) -> dict[str, Any]:
    """The sweep, and the entry at the checkpoint's own threshold (its calibration on the validation split)."""
    from pipeline.training.alerts import alert_sweep, best_threshold

    own = config.get("threshold")
    sweep = alert_sweep(model, samples, sorted({*thresholds, *([own] if own is not None else [])}), settle=settle,
                        progress=True)
    at_own = next((entry for entry in sweep if entry["threshold"] == own), None)
    return {"model": {key: config[key] for key in ("preset", "bits", "causal")}, "settle": settle,
            "threshold": own, "calibration": config.get("calibration"), "at_threshold": at_own,
            "best_on_this_split": best_threshold(sweep), "sweep": sweep}


def format_alerts(report: dict[str, Any]) -> str:
    """The alert report as a table: one row per threshold, IoU 0.5 and 0.3."""
    model = report["model"]
    first = report["sweep"][0]
    lines = [
        f"{report['checkpoint']} (CMHN {model['preset']}, {model['bits']} bits, "
        f"{'causal' if model['causal'] else 'bidirectional'}) on {report['dataset']}: {first['queries']} standing "
        f"queries x {first['stream_hours'] * 3600:.0f} stream-seconds, {first['moments']} real moments, "
        f"settle {report['settle']} s",
        "",
        f"{'threshold':>9} {'events':>7}   {'IoU 0.5: precision':>18} {'recall':>7} {'F1':>6} {'false/h':>8} "
        f"{'delay p50':>9}   {'IoU 0.3: P':>10} {'R':>6} {'F1':>6}",
    ]
    for entry in report["sweep"]:
        a, b = entry["IoU=0.5"], entry["IoU=0.3"]
        mark = " <- checkpoint" if entry["threshold"] == report["threshold"] else ""
        delay = "-" if a["delay_p50"] is None else f"{a['delay_p50']:.1f} s"
        lines.append(f"{entry['threshold']:>9} {entry['events']:>7}   {a['precision']:>18.3f} {a['recall']:>7.3f} "
                     f"{a['f1']:>6.3f} {a['false_per_stream_hour']:>8.0f} {delay:>9}   {b['precision']:>10.3f} "
                     f"{b['recall']:>6.3f} {b['f1']:>6.3f}{mark}")
    if report["threshold"] is None:
        lines.append("\nthe checkpoint has no calibrated threshold (trained before calibration existed)")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: one row per scoring and NMS protocol, one column per R@n,IoU=m."""
    metrics = list(report["hashed"][next(iter(report["protocols"]))])
    model = report["model"]
    lines = [
        f"{report['checkpoint']} (CMHN {model['preset']}, {model['bits']} bits, "
        f"{'causal' if model['causal'] else 'bidirectional'}) on {report['dataset']}: "
        f"{report['videos']} videos, {report['queries']} queries",
        "",
        f"{'scoring':<12}{'protocol':<12}" + "".join(f"{m:>13}" for m in metrics),
    ]
    for scoring in report["scorings"]:
        for protocol in report["protocols"]:
            row = report[scoring][protocol]
            lines.append(f"{scoring:<12}{protocol:<12}" + "".join(f"{row[m]:>13.3f}" for m in metrics))
    lines.append("")
    lines += [f"{name}: {text}" for name, text in (report["protocols"] | report["scorings"]).items()]
    t = report["query_ms"]
    lines.append(
        f"query side, one query at a time: {t['mean']:.2f} ms mean (p50 {t['p50']:.2f}, p95 {t['p95']:.2f}) = "
        f"sentence encoding {t['encode_mean']:.2f} + QEN and sign {t['qen_sign_mean']:.2f} + "
        f"Hamming ranking {t['hamming_rank_mean']:.3f} ms, over {t['queries']} queries"
    )
    return "\n".join(lines)
