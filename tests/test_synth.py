"""The synthetic dataset: real H.264 files decoded with PyAV, checked against their ground truth by colour."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.datasets import load_activitynet
from pipeline.video.synth import (COLOURS, NOUNS, PHRASINGS, SPLITS, VERBS, Event, SynthConfig, SynthError,
                                  build_dataset, describe, is_complete, plan, render_frames, render_video,
                                  sample_events)
from workers.cli import main as vmh

TINY = SynthConfig(seed=7, train=1, val=1, test=1, fps=4, size=64, min_duration=5, max_duration=7, min_event=1,
                   max_event=3, captions_per_event=2)


def decode(path: Path) -> tuple[np.ndarray, av.video.stream.VideoStream]:
    """All frames [T, H, W, 3] RGB and the video stream of an MP4."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, stream


def colour_pixels(frames: np.ndarray, colour: str) -> np.ndarray:
    """Per frame, the mask [T, H, W] of pixels near the named colour (H.264 moves colours by a few levels)."""
    distance = np.linalg.norm(frames.astype(np.float32) - np.array(COLOURS[colour], np.float32), axis=-1)
    return distance < 60


def one_event(shape: str = "circle", colour: str = "red", action: str = "left") -> Event:
    """A 1.5 s event from 1.0 s to 2.5 s, travelling or resizing well inside the frame."""
    centres = {"left": ((0.7, 0.5), (0.3, 0.5)), "right": ((0.3, 0.5), (0.7, 0.5)),
               "up": ((0.5, 0.7), (0.5, 0.3)), "down": ((0.5, 0.3), (0.5, 0.7))}
    c0, c1 = centres.get(action, ((0.5, 0.5), (0.5, 0.5)))
    s0, s1 = {"grow": (0.15, 0.35), "shrink": (0.35, 0.15)}.get(action, (0.3, 0.3))
    return Event(shape, colour, action, 1.0, 2.5, c0, c1, s0, s1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert build_dataset(out, TINY, progress=False)
    return out


# rendering ----------------------------------------------------------------------------------------------------------


def test_video_is_h264_with_the_asked_rate_size_and_length(tmp_path):
    path = tmp_path / "v.mp4"
    render_video(path, [one_event()], duration=4.0, fps=8, size=96, seed=1)
    frames, stream = decode(path)
    assert stream.codec_context.name == "h264"
    assert stream.format.name == "yuv420p" and (stream.width, stream.height) == (96, 96)
    assert stream.average_rate == 8
    assert frames.shape == (32, 96, 96, 3)
    assert float(stream.duration * stream.time_base) == pytest.approx(4.0)
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("shape", list(NOUNS))
def test_shape_is_visible_exactly_inside_its_span(tmp_path, shape):
    event = one_event(shape, "blue", "grow")
    render_video(tmp_path / "v.mp4", [event], duration=4.0, fps=8, size=96, seed=2)
    frames, _ = decode(tmp_path / "v.mp4")
    area = colour_pixels(frames, "blue").mean(axis=(1, 2))
    inside = (np.arange(len(frames)) >= 8) & (np.arange(len(frames)) < 20)  # [1.0, 2.5) s at 8 fps
    assert (area[inside] > 0.004).all(), area
    assert (area[~inside] < 0.0005).all(), area


@pytest.mark.parametrize("action", list(VERBS))
def test_shape_moves_or_resizes_as_captioned(tmp_path, action):
    render_video(tmp_path / "v.mp4", [one_event("square", "yellow", action)], duration=4.0, fps=8, size=96, seed=3)
    frames, _ = decode(tmp_path / "v.mp4")
    mask = colour_pixels(frames[8:20], "yellow")
    area = mask.sum(axis=(1, 2))
    ys, xs = np.indices(mask.shape[1:])
    centroid = np.stack([(mask * xs).sum(axis=(1, 2)) / area, (mask * ys).sum(axis=(1, 2)) / area], axis=1) / 96
    shift = centroid[-1] - centroid[0]
    expected = {"left": (-0.4, 0), "right": (0.4, 0), "up": (0, -0.4), "down": (0, 0.4)}.get(action, (0, 0))
    np.testing.assert_allclose(shift, expected, atol=0.03)
    steps = np.diff(centroid @ np.array(expected)) if action in ("left", "right", "up", "down") else np.diff(area)
    sign = -1 if action == "shrink" else 1
    assert (sign * steps >= -1e-3).all(), steps  # monotone, frame after frame
    if action in ("grow", "shrink"):
        assert (area[-1] / area[0]) ** sign > 4  # (0.35 / 0.15)^2 = 5.4


def test_later_events_are_drawn_on_top():
    under = one_event("square", "red", "grow")
    over = replace(one_event("circle", "green", "grow"), start=2.0)
    frames = render_frames([under, over], duration=3.0, fps=4, size=64, seed=0)
    assert (frames[9, 32, 32] == COLOURS["green"]).all() and (frames[5, 32, 32] == COLOURS["red"]).all()


def test_star_is_a_pentagram():
    frames = render_frames([replace(one_event("star", "purple", "grow"), size1=0.15)], 3.0, 4, 400, 0)
    star = (frames[4] == COLOURS["purple"]).all(axis=-1)
    radius = 0.15 * 400 / 2
    # area of a regular {5/2} star of circumradius R is about 1.1226 R^2; its tip points up
    assert star.sum() == pytest.approx(1.1226 * radius**2, rel=0.03)
    assert star[round(200 - 0.95 * radius), 200] and not star[round(200 - 0.95 * radius), round(200 + 0.3 * radius)]


# sampling and captions ----------------------------------------------------------------------------------------------


def test_sampled_events_fit_the_video_and_the_frame():
    for seed in range(200):
        events = sample_events(np.random.default_rng(seed), duration=20.0, fps=8)
        assert 1 <= len(events) <= 3 and len({e.colour for e in events}) == len(events)
        assert [e.start for e in events] == sorted(e.start for e in events)
        for e in events:
            assert 0 <= e.start < e.end <= 20.0 and 2.0 <= e.end - e.start <= 12.0
            assert (e.start * 8).is_integer() and (e.end * 8).is_integer()
            for (x, y), size in ((e.centre0, e.size0), (e.centre1, e.size1)):
                assert 0.14 <= size <= 0.36 and size / 2 <= x <= 1 - size / 2 and size / 2 <= y <= 1 - size / 2
            moved = np.subtract(e.centre1, e.centre0)
            if e.action in ("grow", "shrink"):
                assert not moved.any() and (e.size1 > e.size0) == (e.action == "grow")
            else:
                direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[e.action]
                assert moved @ direction >= 0.35 and moved @ direction == pytest.approx(np.abs(moved).sum())


def test_describe_phrases_colour_shape_and_action():
    captions = describe(one_event("circle", "red", "left"))
    assert len(set(captions)) == len(captions) >= PHRASINGS
    expected = {"a red circle moves to the left", "the red disc moves to the left", "a red disc slides left"}
    assert expected <= set(captions)
    assert all(c.startswith(("a red ", "the red ")) for c in captions) and any(c.startswith("the") for c in captions)
    assert set(describe(one_event("square", "blue", "grow"))).isdisjoint(captions)


# the dataset --------------------------------------------------------------------------------------------------------


def test_dataset_is_valid_activitynet_captions(dataset):
    names = sorted(p.name for p in dataset.iterdir())
    assert names == ["manifest.json", "test.json", "train.json", "val.json", "videos"]
    for split in SPLITS:
        data = json.loads((dataset / f"{split}.json").read_text())
        assert len(data) == 1 and all(vid.startswith(split) for vid in data)
        for vid, entry in data.items():
            assert isinstance(entry["duration"], float) and TINY.min_duration <= entry["duration"] <= TINY.max_duration
            assert len(entry["timestamps"]) == len(entry["sentences"]) and len(entry["sentences"]) % 2 == 0
            assert all(0 <= s < e <= entry["duration"] for s, e in entry["timestamps"])
            assert all(isinstance(s, str) and s.strip() for s in entry["sentences"])
            frames, stream = decode(dataset / "videos" / f"{vid}.mp4")
            assert len(frames) == round(entry["duration"] * TINY.fps) and stream.average_rate == TINY.fps
        videos = load_activitynet(dataset / f"{split}.json")
        assert [[list(a.spans[0]) for a in v.annotations] for v in videos] == [d["timestamps"] for d in data.values()]


def test_annotations_match_the_rendered_colours(dataset):
    for vid, entry in json.loads((dataset / "train.json").read_text()).items():
        frames, _ = decode(dataset / "videos" / f"{vid}.mp4")
        times = np.arange(len(frames)) / TINY.fps
        for (start, end), caption in zip(entry["timestamps"], entry["sentences"]):
            colour = next(c for c in COLOURS if f" {c} " in caption)
            area = colour_pixels(frames, colour).mean(axis=(1, 2))
            assert (area[(times >= start) & (times < end)] > 0.003).all(), caption


def test_same_seed_same_annotations_other_seed_others(dataset, tmp_path):
    assert build_dataset(tmp_path / "again", TINY, progress=False)
    for name in ("manifest.json", *(f"{s}.json" for s in SPLITS)):
        assert (tmp_path / "again" / name).read_text() == (dataset / name).read_text()
    assert plan(replace(TINY, seed=8)) != plan(TINY)


def test_complete_dataset_is_skipped_and_a_different_one_refused(dataset, tmp_path):
    video = next((dataset / "videos").iterdir())
    stamp = video.stat().st_mtime_ns
    assert not build_dataset(dataset, TINY, progress=False)
    assert video.stat().st_mtime_ns == stamp
    with pytest.raises(SynthError, match="differs in seed"):
        build_dataset(dataset, replace(TINY, seed=8), progress=False)

    out = tmp_path / "partial"
    build_dataset(out, TINY, progress=False)
    next((out / "videos").iterdir()).unlink()
    assert not is_complete(out, TINY)
    assert build_dataset(out, TINY, progress=False) and is_complete(out, TINY)
    assert build_dataset(out, replace(TINY, seed=8), force=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 8


def test_cli_renders_then_skips(tmp_path, capsys):
    flags = ["--out", str(tmp_path), "--train", "1", "--val", "0", "--test", "0", "--fps", "4", "--size", "64",
             "--min-duration", "3", "--max-duration", "3", "--max-event", "2", "--no-progress"]
    assert vmh(["synth", *flags]) == 0
    assert "rendered 1 train" in capsys.readouterr().out
    assert vmh(["synth", *flags]) == 0
    assert "skipped" in capsys.readouterr().out
    assert vmh(["synth", *flags, "--seed", "1"]) == 2
    assert "differs in seed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(size=65), "even"),
        (dict(fps=0), "fps"),
        (dict(max_event=30.0), "max_event <= min_duration"),
        (dict(train=-1), "counts"),
        (dict(captions_per_event=PHRASINGS + 1), "captions_per_event"),
    ],
)
def test_bad_config_is_refused(bad, message):
    with pytest.raises(SynthError, match=message):
        SynthConfig(**bad)


def test_bad_events_are_refused():
    with pytest.raises(SynthError, match="does not fit"):
        render_frames([one_event()], duration=2.0, fps=4, size=64, seed=0)
    with pytest.raises(SynthError, match="unknown"):
        describe(one_event(shape="hexagon"))
    with pytest.raises(SynthError, match="cannot fit"):
        sample_events(np.random.default_rng(0), duration=1.0, fps=4)


def test_interrupted_render_leaves_no_complete_dataset(tmp_path, monkeypatch):
    import pipeline.video.synth as synth

    build_dataset(tmp_path, TINY, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "render_video", crash)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(tmp_path, replace(TINY, seed=8), force=True, progress=False)
    assert not is_complete(tmp_path, TINY) and not is_complete(tmp_path, replace(TINY, seed=8))
