"""Benchmarks: smoke runs with tiny parameters (report fields, checks that pass), and a broken 'ours' failing each
benchmark's correctness check. No timing assertions: this machine is shared."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import ExitStack

import numpy as np
import pytest

from workers import cli
from workers.bench import BENCHMARKS, decode, encoder, features, load, matching
from workers.bench.runner import Case, Verdict, measure, run_benchmark

REPORT_FIELDS = {"name", "ratio", "reference", "median_ours", "median_reference", "unit", "params", "target",
                 "machine", "check", "cases"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny ops on two busy shared cores spend most of their time waiting for the second thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def broken_run(bench, params, corrupt) -> list[str]:
    """The check's problems when every output of 'ours' goes through ``corrupt``."""
    with ExitStack() as stack:
        problems = []
        for case in bench.cases(params, stack):
            ours = case.ours
            problems += measure(dataclasses.replace(case, ours=lambda: corrupt(case.label, ours())), 1, 0).problems
    return problems


def assert_report(result: dict, name: str, cases: int) -> None:
    assert REPORT_FIELDS <= result.keys()
    assert result["name"] == name and result["check"] == {"passed": True, "problems": []}
    assert len(result["cases"]) == cases
    assert result["ratio"] == min(c["ratio"] for c in result["cases"]) > 0
    assert result["median_ours"] > 0 and result["median_reference"] > 0
    assert {"cores", "cpu", "torch_threads"} <= result["machine"].keys()
    for case in result["cases"]:
        assert case["check"]["passed"] and case["check"]["counts"]
    json.dumps(result)


def test_measure_interleaves_times_only_after_warmup_and_checks_every_call():
    calls, checked = [], []
    case = Case("c", lambda: calls.append("o") or len(calls), lambda: calls.append("r") or len(calls), 10.0,
                lambda a, b: checked.append((a, b)) or Verdict(["bad"] if a == 5 else [], {"n": 1}))
    measured = measure(case, repeats=2, warmup=1)
    assert calls == ["o", "r", "r", "o", "o", "r"]  # order alternates every call
    assert len(checked) == 3 and measured.counts == {"n": 3}
    assert len(measured.seconds["ours"]) == len(measured.seconds["reference"]) == 2
    assert measured.problems == ["call 3: bad"]
    with pytest.raises(ValueError, match="repeats"):
        measure(case, repeats=0, warmup=0)


def test_every_benchmark_declares_what_the_runner_and_cli_need():
    for name in BENCHMARKS:
        bench = load(name)
        assert bench.NAME == name and bench.TARGET > 0 and bench.TITLE and bench.REFERENCE and bench.UNIT
        assert hasattr(bench, "cases") or (hasattr(bench, "measure") and hasattr(bench, "table"))
        assert all(f.metadata.get("help") for f in dataclasses.fields(bench.Params))
    with pytest.raises(KeyError, match="unknown benchmark"):
        load("nope")


def test_loop_remux_keeps_timestamps_increasing(tmp_path):
    import av

    frames, seconds = decode.looped(decode.bigbuckbunny(), 6.0, str(tmp_path / "loop.mp4"))
    with av.open(str(tmp_path / "loop.mp4")) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert len(times) == frames == 2 * 132 and seconds == pytest.approx(2 * 5.28)
    assert np.all(np.diff(times) > 0) and times[-1] == pytest.approx(seconds - 1 / 25)


def test_decode_smoke_and_broken():
    params = decode.Params(seconds=5.0, frame_size=32)
    result = run_benchmark(decode, params, repeats=1, warmup=0)
    assert_report(result, "decode", 3)  # I/P, IBBBP, B-pyramid
    assert all(c["check"]["counts"]["frames compared"] == 21 for c in result["cases"])  # slots 0..20 of 5.28 s at 4 a second
    assert broken_run(decode, params, lambda _, frames: frames[:-1])
    shifted = broken_run(decode, params, lambda _, frames: [(t + 0.01, rgb) for t, rgb in frames])
    assert any("reference's at" in p for p in shifted)


def test_features_smoke_and_broken():
    params = features.Params(sizes="112", frames=4, batch_size=2)
    assert_report(run_benchmark(features, params, repeats=1, warmup=0), "features", 1)
    problems = broken_run(features, params, lambda _, out: out * 1.01)
    assert any("largest difference" in p for p in problems)


def test_encoder_smoke_and_broken():
    params = encoder.Params(preset="lite", streams=2, window=40, video_dim=16)  # lite: receptive field 27 s
    result = run_benchmark(encoder, params, repeats=1, warmup=1)
    assert_report(result, "encoder", 1)
    assert result["cases"][0]["check"]["counts"]["moments compared"] > 0

    def flip_largest(_, moments):
        m = moments[0]
        bit = int(np.argmax(np.abs(m.values)))
        code = m.code.copy()
        code[bit // 8] ^= 0x80 >> (bit % 8)
        return [m._replace(code=code), *moments[1:]]

    assert any("not within rounding" in p for p in broken_run(encoder, params, flip_largest))
    assert any("missing" in p for p in broken_run(encoder, params, lambda _, moments: moments[1:]))
    with pytest.raises(ValueError, match="receptive field"):
        run_benchmark(encoder, dataclasses.replace(params, window=20), repeats=1, warmup=0)


def test_matching_smoke_and_broken():
    # 32-bit codes: many equal distances, so ties and a few hundred standing-query hits are exercised
    params = matching.Params(codes=3000, queries=20, bits=32, standing=300, moments=400, batch=150, threshold=10,
                             archive=20_000, window_hours=0.01, searches=5)
    result = run_benchmark(matching, params, repeats=1, warmup=0)
    assert_report(result, "matching", 5)
    counts = {c["case"]: c["check"]["counts"] for c in result["cases"]}
    assert counts["range"]["hits compared"] > 0 and counts["standing"]["hits compared"] > 0
    notes = {c["case"]: c["notes"] for c in result["cases"]}
    assert 0 < notes["archive-range"]["moments_in_window"] < 20_000 and notes["archive-day"]["moments"] == 20_000
    assert notes["archive-day"]["bytes_per_moment"] >= 4 + 18  # 32-bit codes and their metadata

    def corrupt(label, out):
        if label == "topk":
            distances, indices = out
            return distances, indices[:, ::-1].copy()  # the right codes in the wrong order
        if label == "range":
            lims, distances, indices = out
            return lims, distances, indices + 1
        return out[:-1]

    problems = broken_run(matching, params, corrupt)
    assert {p.split(":")[0] for p in problems} == {"call 1"} and len(problems) == 5


def test_matching_topk_check_accepts_another_order_of_ties():
    codes = np.array([[0b1111], [0b0001], [0b0010], [0b0000]], np.uint8)
    queries = np.array([[0b0011]], np.uint8)
    distances = np.array([[1, 1, 2]], np.int32)
    faiss = (distances, np.array([[1, 2, 0]]))  # codes 1 and 2 at distance 1, codes 0 and 3 at distance 2
    for tie_order in ([[2, 1, 0]], [[1, 2, 3]], [[2, 1, 3]]):
        assert not matching.check_topk((distances, np.array(tie_order)), faiss, codes, queries).problems
    for wrong in ([[0, 2, 1]], [[2, 2, 0]]):  # code 0 is not at distance 1; code 2 twice
        assert matching.check_topk((distances, np.array(wrong)), faiss, codes, queries).problems


def test_radius_for_gives_the_expected_hits():
    radius = matching.radius_for(30.0, 1_000_000, 128)
    below = lambda r: sum(math.comb(128, d) for d in range(r)) / 2**128 * 1_000_000  # noqa: E731
    assert below(radius) >= 30.0 > below(radius - 1)
    assert matching.radius_for(0.0, 10, 8) == 0


@pytest.mark.integration
def test_bus_smoke_and_broken(kafka_bootstrap):
    from workers.bench import bus

    params = bus.Params(records=40, dim=64, streams=4, partitions=2, bootstrap_servers=kafka_bootstrap)
    result = run_benchmark(bus, params, repeats=1, warmup=1)
    assert_report(result, "bus", 1)
    assert result["cases"][0]["check"]["counts"]["records sent"] == 2 * 2 * 40
    problems = broken_run(bus, params, lambda _, sent: sent + 1)  # claims one more record than the topic holds
    assert any("holds 40 records, 41 were sent" in p for p in problems)


def test_cli_prints_json_and_fails_on_a_failed_check(capsys, monkeypatch):
    argv = ["bench", "matching", "--json", "--repeats", "1", "--warmup", "0", "--codes", "500", "--queries", "4",
            "--standing", "50", "--moments", "20", "--batch", "10", "--archive", "3000", "--searches", "2"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert REPORT_FIELDS <= result.keys() and result["params"]["codes"] == 500 and result["repeats"] == 1
    monkeypatch.setattr(matching, "check_range", lambda a, b: Verdict(["made up"]))
    assert cli.main(argv[:2] + argv[3:]) == 1
    assert "made up" in capsys.readouterr().out


def test_e2e_model_is_the_published_architecture_and_its_query_matches_every_moment(tmp_path):
    import json

    from workers.bench.e2e import Params, _lite_checkpoint, _match_everything, with_published_frame_path
    from pipeline.weights import published_checkpoint

    published = json.loads((published_checkpoint() / "config.json").read_text())
    checkpoint = _lite_checkpoint(tmp_path / "lite", with_published_frame_path(Params()))
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["bits"], config.get("members", 1)) == (published["bits"], published.get("members", 1))
    code, threshold = _match_everything(checkpoint)
    assert len(code) * 8 == threshold == config["bits"]


def test_e2e_search_doubles_until_a_count_fails_then_bisects():
    from workers.bench.e2e import next_count

    assert [next_count(1, None, 1), next_count(8, None, 8)] == [2, 16]
    assert next_count(8, 16, 16) == 12 and next_count(12, 16, 12) == 14 and next_count(14, 15, 15) is None
    assert next_count(0, 1, 1) is None  # not even one stream: nothing to bisect


def test_e2e_cpu_stages_count_ended_decode_threads_and_split_the_main_thread():
    from workers.bench.e2e import STAGE_CPU, _Workers

    def snap(t, producer, threads, features, publish, encoder):
        return {"time": t, "cpu": {"producer 0": (producer, threads), "encoder": (encoder, {})},
                "metrics": [{f"{STAGE_CPU}:features": features, f"{STAGE_CPU}:publish": publish}]}

    first = snap(0.0, 10.0, {"1 python": 4.0, "2 kafka-producer": 1.0, "3 av:h264:df0": 5.0}, 3.0, 0.5, 2.0)
    # over 10 s the codec thread 3 ended (a looped file reopened) and thread 4 took over
    last = snap(10.0, 30.0, {"1 python": 12.0, "2 kafka-producer": 2.0, "4 av:h264:df0": 3.0}, 9.0, 1.5, 5.0)
    cores = _Workers.stages(first, last)
    assert cores["cnn"] == 0.6 and cores["kafka clients"] == 0.2 and cores["other"] == 0.1
    assert cores["decode"] == 1.1 and cores["encoder"] == 0.3  # 20 s of the process less main and Kafka threads


def test_streams_are_dealt_round_robin_over_one_producer_per_core():
    from workers.up import spread

    assert spread(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert spread(["a"], 4) == [["a"]]  # no producer without streams
    assert len(spread([str(i) for i in range(24)])) == min(24, os.cpu_count() or 1)
