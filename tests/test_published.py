"""The published model (pipeline/weights) as users meet it: it loads as an ordinary checkpoint, its
threshold is its own, and on held-out videos rendered and extracted here, through the live logic, most of its alerts
are right and it finds most moments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.model import load_checkpoint
from pipeline.model.checkpoint import WEIGHTS, calibrated_threshold
from pipeline.settings import resolve
from pipeline.weights import LITE_SYNTH, published_checkpoint, published_extractor
from pipeline.video.synth import SynthConfig, build_dataset
from workers.cli import main as vmh

# the demo's held-out split, which no training, epoch selection or calibration of the published model saw
HELD_OUT = SynthConfig(seed=7, train=0, val=0, test=8)
FLAGS = {"sample_rate": "--sample-rate", "frame_size": "--frame-size", "spatial_grid": "--spatial-grid",
         "motion_grid": "--motion-grid", "motion_planes": "--motion-planes", "motion_expansion": "--motion-expansion"}


def test_the_published_model_loads_as_a_checkpoint_with_its_own_threshold() -> None:
    path = published_checkpoint()
    model, config = load_checkpoint(path, preset="lite", sentence_encoder="all-MiniLM-L6-v2")
    assert config["extractor"]["backbone"] == "mobilenet_v2" and config["extractor"]["dim"] == config["video_dim"]
    assert calibrated_threshold(path) == config["calibration"]["threshold"] < model.config.bits // 2
    stored = torch.load(path / WEIGHTS, weights_only=True)
    assert {t.dtype for t in stored.values()} == {torch.float16}  # half the size on disk, float32 once loaded
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert config["extra"]["published"]["split"] and config["extra"]["published"]["IoU=0.5"]["f1"] > 0.5


def test_an_unknown_published_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match=rf"no published checkpoint 'lite-synth-v9'.*{LITE_SYNTH}"):
        published_checkpoint("lite-synth-v9")


def test_the_checkpoint_setting_names_a_published_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMH_CHECKPOINT", LITE_SYNTH)
    assert resolve("checkpoint") == str(published_checkpoint())
    monkeypatch.chdir(tmp_path)
    (tmp_path / LITE_SYNTH).mkdir()  # a directory of one's own by that name is what it means
    assert resolve("checkpoint") == LITE_SYNTH
    monkeypatch.setenv("VMH_CHECKPOINT", "models/mine")
    assert resolve("checkpoint") == "models/mine"


def test_the_published_model_alerts_on_held_out_videos(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rendered, decoded and extracted here, so a change to the generator, the decoder or the frame CNN that the
    weights no longer fit shows up as lost alerts, not only as a different number."""
    path = published_checkpoint()
    extractor = published_extractor()
    build_dataset(tmp_path, HELD_OUT, progress=False)
    flags = [str(v) for key, flag in FLAGS.items() for v in (flag, extractor[key])]
    assert vmh(["extract", str(tmp_path / "videos"), "--out", str(tmp_path / "features"), "--no-progress",
                "--device", "cpu", *flags]) == 0
    threshold = calibrated_threshold(path)
    capsys.readouterr()
    assert vmh(["eval", "--alerts", "--json", "--checkpoint", str(path), "--dataset",
                f"activitynet:{tmp_path / 'test.json'}", "--features", str(tmp_path / "features"), "--device", "cpu",
                "--thresholds", f"{threshold}:{threshold}:1"]) == 0
    report = json.loads(capsys.readouterr().out)["at_threshold"]
    assert report["threshold"] == threshold
    assert report["IoU=0.5"]["precision"] >= 0.6 and report["IoU=0.5"]["recall"] >= 0.45, report
