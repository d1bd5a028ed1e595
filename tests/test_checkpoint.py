"""Checkpoints rebuild the same model and refuse to pair it with a preset, extractor or encoder it was not made for."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.model import CMHN, PRESETS, CheckpointError, CheckpointMismatch, ensemble, load_checkpoint, save_checkpoint

EXTRACTOR = {"backbone": "mobilenet_v2", "weights": "imagenet-offline", "frame_size": 224, "sample_rate": 4.0}
ENCODER = "all-MiniLM-L6-v2"


def small(preset: str = "lite", **changes) -> CMHN:
    torch.manual_seed(0)
    return CMHN(replace(PRESETS[preset], video_dim=6, sentence_dim=5, bits=16, **changes)).eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, CMHN]:
    model = small()
    return save_checkpoint(tmp_path / "ckpt", model, EXTRACTOR, ENCODER, {"epoch": 3}), model


def test_round_trip_gives_the_same_outputs(saved: tuple[Path, CMHN]) -> None:
    path, model = saved
    loaded, config = load_checkpoint(path, preset="lite", extractor=EXTRACTOR, sentence_encoder=ENCODER)
    assert loaded.config == model.config and not loaded.training
    video, sentences = torch.randn(30, 6), torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.ven(video), model.ven(video), rtol=0, atol=0)
        torch.testing.assert_close(loaded.qen(sentences), model.qen(sentences), rtol=0, atol=0)
    # keys added since EXTRACTOR's day are filled in as every extractor had them then
    assert config["extractor"] == EXTRACTOR | {"spatial_grid": 1, "motion_grid": 0}
    assert config["sentence_encoder"] == ENCODER
    assert config["extra"] == {"epoch": 3}
    assert config["preset"] == "lite" and config["channels"] == list(PRESETS["lite"].channels)


def test_an_ensemble_round_trips(tmp_path: Path) -> None:
    joined = ensemble([small(), _reseeded()])
    path = save_checkpoint(tmp_path / "ensemble", joined, EXTRACTOR, ENCODER)
    loaded, config = load_checkpoint(path, preset="lite", extractor=EXTRACTOR, sentence_encoder=ENCODER)
    assert (config["members"], config["bits"]) == (2, 32) and loaded.config == joined.config
    video, sentences = torch.randn(30, 6), torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.ven(video), joined.ven(video), rtol=0, atol=0)
        assert loaded.qen(sentences).shape == (4, 32)
        # the second member's half is its own, not a copy of the first's
        assert not torch.equal(loaded.qen(sentences)[:, :16], loaded.qen(sentences)[:, 16:])


def test_vmh_ensemble_joins_checkpoints_of_one_frame_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from workers.cli import main

    first = save_checkpoint(tmp_path / "a", small(), EXTRACTOR, ENCODER, {"epoch": 3})
    second = save_checkpoint(tmp_path / "b", _reseeded(), EXTRACTOR, ENCODER, {"epoch": 5})
    assert main(["ensemble", str(first), str(second), "--out", str(tmp_path / "joined")]) == 0
    _, config = load_checkpoint(tmp_path / "joined", extractor=EXTRACTOR, sentence_encoder=ENCODER)
    assert config["members"] == 2 and "threshold" not in config  # calibrated next, in its own bits
    assert config["extra"]["members"] == [{"checkpoint": "a", "epoch": 3}, {"checkpoint": "b", "epoch": 5}]
    other = save_checkpoint(tmp_path / "c", _reseeded(), {**EXTRACTOR, "frame_size": 160}, ENCODER)
    assert main(["ensemble", str(first), str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "extractor" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["ensemble", str(first), "--out", str(tmp_path / "bad")]) == 2


def _reseeded() -> CMHN:
    torch.manual_seed(1)
    return CMHN(replace(PRESETS["lite"], video_dim=6, sentence_dim=5, bits=16)).eval()


def test_a_model_of_another_preset_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, small("tacos", channels=(16, 8)), EXTRACTOR, ENCODER)
    with pytest.raises(CheckpointMismatch) as caught:
        load_checkpoint(path, preset="lite")
    names = [name for name, _, _ in caught.value.mismatches]
    assert names == ["preset", "channels", "kernel_sizes", "strides"]
    assert "preset: expected 'lite', found 'tacos'" in str(caught.value) and str(path) in str(caught.value)


def test_a_changed_preset_is_detected(tmp_path: Path) -> None:
    """Saved under the name `lite` when lite had other channels: the name alone must not pass."""
    path = save_checkpoint(tmp_path, small(channels=(32, 32)), EXTRACTOR, ENCODER)
    with pytest.raises(CheckpointMismatch, match=r"channels: expected \[256, 256\], found \[32, 32\]") as caught:
        load_checkpoint(path, preset="lite")
    assert len(caught.value.mismatches) == 1
    model, _ = load_checkpoint(path)  # without expectations the checkpoint describes itself
    assert model.config.channels == (32, 32)


def test_extractor_fields_that_differ_are_each_named(saved: tuple[Path, CMHN]) -> None:
    path, _ = saved
    expected = {**EXTRACTOR, "sample_rate": 2.0, "crop": "center"}
    del expected["weights"]
    with pytest.raises(CheckpointMismatch) as caught:
        load_checkpoint(path, extractor=expected)
    assert caught.value.mismatches == [
        ("extractor.crop", "center", None),
        ("extractor.sample_rate", 2.0, 4.0),
        ("extractor.weights", None, "imagenet-offline"),
    ]


def test_sentence_encoder_and_version_mismatch(saved: tuple[Path, CMHN]) -> None:
    path, _ = saved
    with pytest.raises(CheckpointMismatch, match="sentence_encoder: expected 'bert-large', found 'all-MiniLM-L6-v2'"):
        load_checkpoint(path, sentence_encoder="bert-large")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(CheckpointMismatch, match="version: expected 1, found 99"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path, saved: tuple[Path, CMHN]) -> None:
    with pytest.raises(CheckpointError, match=f"no CMHN checkpoint at {tmp_path / 'nowhere'}"):
        load_checkpoint(tmp_path / "nowhere")
    path, _ = saved
    (path / "weights.pt").unlink()
    with pytest.raises(CheckpointError, match="needs config.json and weights.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("config.json", b"{not json", "corrupt checkpoint config"),
        ("config.json", b"[1, 2]", "expected a JSON object"),
        ("config.json", json.dumps({"version": 1, "preset": "lite"}).encode(), "bad model config"),
        ("weights.pt", b"\x00garbage", "corrupt or mismatched weights"),
    ],
)
def test_corrupt_checkpoint(saved: tuple[Path, CMHN], name: str, content: bytes, message: str) -> None:
    path, _ = saved
    (path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_or_foreign_weights(saved: tuple[Path, CMHN], tmp_path: Path) -> None:
    path, _ = saved
    weights = (path / "weights.pt").read_bytes()
    (path / "weights.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt or mismatched weights"):
        load_checkpoint(path)
    torch.save(small("tacos", channels=(16, 8)).state_dict(), path / "weights.pt")
    with pytest.raises(CheckpointError, match="corrupt or mismatched weights"):
        load_checkpoint(path)


def test_unserialisable_metadata_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ckpt", small(), {"weights": object()}, ENCODER)
    assert not (tmp_path / "ckpt").exists()


def test_an_extractor_recorded_before_a_key_existed_names_the_same_frame_path(saved: tuple[Path, CMHN]) -> None:
    """EXTRACTOR predates spatial_grid: it means the global pooling every extractor did then."""
    path, _ = saved
    load_checkpoint(path, extractor=EXTRACTOR | {"spatial_grid": 1})
    with pytest.raises(CheckpointMismatch, match="extractor.spatial_grid: expected 2, found 1"):
        load_checkpoint(path, extractor=EXTRACTOR | {"spatial_grid": 2})
