"""Settings from the environment and vmh.toml: a value that does not parse is named with where it came from, and
the command stops before doing anything, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings import SettingError, one_of, resolve
from workers.cli import main as vmh


def test_a_bad_environment_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("VMH_SAMPLE_RATE", "fast")
    with pytest.raises(SettingError, match="environment variable VMH_SAMPLE_RATE = 'fast' is not a valid sample-rate"):
        resolve("sample-rate")
    assert vmh(["extract", "videos", "--out", "features"]) == 2
    assert "VMH_SAMPLE_RATE = 'fast'" in capsys.readouterr().err


def test_a_bad_config_value_names_its_file_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vmh.toml"
    config.write_text('keyframes = "maybe"\nmotion_planes = "rgb"\n')
    monkeypatch.setenv("VMH_CONFIG", str(config))
    with pytest.raises(SettingError, match=r"vmh.toml key keyframes = 'maybe' is not a valid keyframes: .*yes/no"):
        resolve("keyframes")
    with pytest.raises(SettingError, match="'rgb' is not one of y, yuv"):
        resolve("motion-planes")
    monkeypatch.setenv("VMH_MOTION_PLANES", "y")  # the environment comes first
    assert resolve("motion-planes") == "y"


def test_one_of_takes_only_its_words() -> None:
    planes = one_of("y", "yuv")
    assert planes("yuv") == "yuv"
    with pytest.raises(ValueError, match="'YUV' is not one of y, yuv"):
        planes("YUV")
