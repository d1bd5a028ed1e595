"""Annotation readers: the project's own small fixtures, then the real public files when they are at hand."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path

import pytest

from pipeline.datasets import (Annotation, AnnotationError, Video, dump_activitynet, load_activitynet, load_charades,
                               load_dataset, load_qvhighlights, load_tacos, parse_dataset_spec, read_durations)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "annotations"


def spans_of(videos: list[Video]) -> dict[str, list[tuple[tuple[float, float], ...]]]:
    return {v.video_id: [tuple((round(s, 9), round(e, 9)) for s, e in a.spans) for a in v.annotations] for v in videos}


def lines_of(errors: list[AnnotationError]) -> list[int | None]:
    return [e.line for e in errors]


# Charades-STA -------------------------------------------------------------------------------------------------------


def test_charades_strict_stops_at_first_bad_line():
    with pytest.raises(AnnotationError, match=r"charades_sta_test\.txt:4: expected 'VIDEO START END'") as info:
        load_charades(FIXTURES / "charades_sta_test.txt")
    assert info.value.line == 4


def test_charades_lenient_skips_and_reports_bad_lines():
    errors: list[AnnotationError] = []
    videos = load_charades(FIXTURES / "charades_sta_test.txt", errors=errors)
    assert lines_of(errors) == [4, 5, 8]
    assert "start is not before end" in str(errors[1]) and "missing '##'" in str(errors[2])
    assert [(v.video_id, v.duration) for v in videos] == [("VID01", 15.5), ("VID02", 30.0), ("VID03", 20.25)]
    assert spans_of(videos) == {"VID01": [((0.0, 5.5),), ((3.2, 12.0),)],
                                "VID02": [((1.0, 30.0),)],  # end 40 clipped to the CSV's 30 s
                                "VID03": [((2.0, 6.0),)]}
    assert videos[2].annotations[0].sentence == "a person waves."


def test_charades_durations_csv_handles_quoted_newlines():
    assert read_durations(FIXTURES / "Charades_v1_test.csv") == {"VID01": 15.5, "VID02": 30.0, "VID03": 20.25}


def test_charades_missing_durations_fall_back_to_latest_end_with_warning():
    with pytest.warns(UserWarning, match=r"no duration for 2 of 3 videos"):
        videos = load_charades(FIXTURES / "charades_sta_test.txt", durations={"VID02": 100.0}, errors=[])
    assert [(v.video_id, v.duration) for v in videos] == [("VID01", 12.0), ("VID02", 100.0), ("VID03", 6.0)]
    assert videos[1].annotations[0].spans == ((1.0, 40.0),)


def test_charades_known_durations_do_not_warn(tmp_path):
    (tmp_path / "charades_sta_test.txt").write_text("A 1 2##x.\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_charades(tmp_path / "charades_sta_test.txt", durations={"A": 3.0})[0].duration == 3.0


def test_charades_zero_length_span_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("A 1 2##fine.\nA 3 3##nothing happens.\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:2: span \[3, 3\]: start is not before end"):
        load_charades(tmp_path / "a.txt", durations={"A": 5.0})


def test_charades_bad_csv_value_names_its_line(tmp_path):
    (tmp_path / "d.csv").write_text("id,length\nA,3\nB,soon\n")
    with pytest.raises(AnnotationError, match=r"d\.csv:3: length must be a number, got 'soon'"):
        read_durations(tmp_path / "d.csv")


# TACoS and ActivityNet Captions -------------------------------------------------------------------------------------


def test_tacos_frames_become_seconds_and_bad_entries_are_reported():
    with pytest.raises(AnnotationError, match=r"video 's1-d1\.avi', timestamps\[2\]: span \[5, 4\]"):
        load_tacos(FIXTURES / "tacos.json")
    errors: list[AnnotationError] = []
    videos = load_tacos(FIXTURES / "tacos.json", errors=errors)
    assert [e.where for e in errors] == ["video 's1-d1.avi', timestamps[2]", "video 's1-d2.avi'"]
    assert "same length" in errors[1].message
    assert [(v.video_id, v.duration) for v in videos] == [("s1-d1.avi", 10.0), ("s2-d1.avi", 30.0)]
    assert spans_of(videos) == {"s1-d1.avi": [((0.0, 3.0),), ((2.0, 10.0),)], "s2-d1.avi": [((1.0, 3.0),)]}


def test_activitynet_clips_strips_and_reports():
    errors: list[AnnotationError] = []
    videos = load_activitynet(FIXTURES / "activitynet.json", errors=errors)
    assert [e.where for e in errors] == ["video 'v_b2', timestamps[1]", "video 'v_c3'"]
    assert "outside the video [0, 12.5]" in errors[0].message and "missing field 'duration'" in errors[1].message
    assert spans_of(videos) == {"v_a1": [((0.0, 8.5),), ((6.0, 20.0),)], "v_b2": [((2.0, 4.0),)],
                                "v_d4": [((0.0, 10.0),)]}
    assert videos[0].annotations[1].sentence == "The dog chases a ball."


def test_json_syntax_error_raises_even_when_lenient(tmp_path):
    (tmp_path / "a.json").write_text('{"v": {"duration": 3,\n "timestamps": [[0, 1]]\n "sentences": ["x"]}}')
    with pytest.raises(AnnotationError, match=r"a\.json:3: invalid JSON"):
        load_activitynet(tmp_path / "a.json", errors=[])


def test_activitynet_round_trip(tmp_path):
    videos = [Video("synthetic_0001", 42.0, (Annotation("a red square appears", ((3.0, 9.0),)),
                                              Annotation("it turns blue", ((9.0, 41.5),)))),
              Video("synthetic_0002", 7, (Annotation("nothing moves", ((0.0, 7.0),)),))]
    dump_activitynet(videos, tmp_path / "synthetic.json")
    assert load_activitynet(tmp_path / "synthetic.json") == videos


def test_activitynet_dump_refuses_several_spans(tmp_path):
    video = Video("v", 10.0, (Annotation("one", ((0.0, 1.0),)), Annotation("two", ((1.0, 2.0), (4.0, 5.0)))))
    with pytest.raises(ValueError, match=r"'two' has 2"):
        dump_activitynet([video], tmp_path / "x.json")


# QVHighlights --------------------------------------------------------------------------------------------------------


def test_qvhighlights_keeps_every_window_and_reports_lines():
    with pytest.raises(AnnotationError, match=r"qvhighlights\.jsonl:3: invalid JSON"):
        load_qvhighlights(FIXTURES / "qvhighlights.jsonl")
    errors: list[AnnotationError] = []
    videos = load_qvhighlights(FIXTURES / "qvhighlights.jsonl", errors=errors)
    assert lines_of(errors) == [3, 4, 7]
    assert "duration 126 here, 150 on an earlier line" in errors[2].message
    assert spans_of(videos) == {"abc_60.0_210.0": [((82.0, 100.0), (120.0, 150.0)), ((140.0, 150.0),)],
                                "xyz_0.0_150.0": [((2.0, 6.0),)]}
    assert [a.query_id for v in videos for a in v.annotations] == [1, 2, 6]


# Dispatch ------------------------------------------------------------------------------------------------------------


def test_load_dataset_dispatches_by_kind():
    assert load_dataset("tacos", FIXTURES / "tacos.json", errors=[]) == load_tacos(FIXTURES / "tacos.json", errors=[])
    with pytest.raises(ValueError, match="unknown dataset kind 'didemo'; expected one of charades, tacos"):
        load_dataset("didemo", FIXTURES / "tacos.json")


def test_parse_dataset_spec():
    assert parse_dataset_spec("activitynet:/x/val.json") == ("activitynet", Path("/x/val.json"))
    assert parse_dataset_spec("charades:C:/data/a.txt") == ("charades", Path("C:/data/a.txt"))
    for bad in ("activitynet", "activitynet:", "imdb:/x.json"):
        with pytest.raises(ValueError, match="KIND:PATH|unknown dataset kind"):
            parse_dataset_spec(bad)


# The real public files -----------------------------------------------------------------------------------------------


def _shared_annotations() -> Path:
    root = os.environ.get("VMH_SHARED_DATA")
    data = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    return data / "annotations"


REAL = _shared_annotations()
real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real annotations not found at {REAL} "
                                                    "(set VMH_SHARED_DATA to the directory holding annotations/)")


def _nonempty_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@real
@pytest.mark.parametrize("split", ["test", "train"])
def test_real_charades_every_line(split):
    path = REAL / f"charades_sta_{split}.txt"
    if split == "test" and not (REAL / "Charades_v1_test.csv").is_file():
        pytest.skip(f"Charades_v1_test.csv not found beside {path}")
    lines = _nonempty_lines(path)
    reversed_lines = [i for i, line in enumerate(path.read_text().split("\n"), 1)
                      if (m := re.match(r"\S+ ([\d.]+) ([\d.]+)##", line)) and float(m[1]) >= float(m[2])]
    errors: list[AnnotationError] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        videos = load_charades(path, errors=errors)
    assert lines_of(errors) == reversed_lines  # 2D-TAN drops these too; test has none, train has four
    assert sum(len(v.annotations) for v in videos) == len(lines) - len(reversed_lines)
    assert {v.video_id for v in videos} | {lines[i - 1].split()[0] for i in reversed_lines} \
        == {line.split(" ", 1)[0] for line in lines}
    # the loader's own warning only: catch_warnings is process-wide, and another test's thread or garbage may warn
    guessed = [str(w.message) for w in caught if "no duration for" in str(w.message)]
    if split == "test":  # its durations come from Charades_v1_test.csv
        assert not guessed
        with open(REAL / "Charades_v1_test.csv", newline="") as f:
            length = {row[0]: float(row[-1]) for row in csv.reader(f) if row[0] != "id"}
        assert all(v.duration == length[v.video_id] for v in videos)
    else:  # Charades_v1_train.csv is not redistributed
        assert guessed
    assert all(0 <= s < e <= v.duration for v in videos for a in v.annotations for s, e in a.spans)


@real
def test_real_tacos_every_sentence():
    raw = json.loads((REAL / "tacos_test.json").read_text())
    videos = load_tacos(REAL / "tacos_test.json")
    assert len(videos) == len(raw)
    assert sum(len(v.annotations) for v in videos) == sum(len(e["sentences"]) for e in raw.values())
    first = videos[0]
    entry = raw[first.video_id]
    assert first.duration == pytest.approx(entry["num_frames"] / entry["fps"])
    assert first.annotations[0].spans[0] == pytest.approx(tuple(t / entry["fps"] for t in entry["timestamps"][0]))


@real
def test_real_activitynet_every_sentence():
    raw = json.loads((REAL / "activitynet_captions_val.json").read_text())
    videos = load_activitynet(REAL / "activitynet_captions_val.json")
    assert [v.video_id for v in videos] == list(raw)
    assert sum(len(v.annotations) for v in videos) == sum(len(e["timestamps"]) for e in raw.values())
    assert all(0 <= s < e <= v.duration for v in videos for a in v.annotations for s, e in a.spans)


@real
def test_real_qvhighlights_every_query_and_window():
    path = REAL / "qvhighlights_val.jsonl"
    rows = [json.loads(line) for line in _nonempty_lines(path)]
    videos = load_qvhighlights(path)
    annotations = [a for v in videos for a in v.annotations]
    assert len(videos) == len({r["vid"] for r in rows})
    assert sorted(a.query_id for a in annotations) == sorted(r["qid"] for r in rows)
    assert sum(len(a.spans) for a in annotations) == sum(len(r["relevant_windows"]) for r in rows)
    assert max(len(a.spans) for a in annotations) > 1
