"""CMHN checkpoints: a directory with weights.pt (a torch state_dict) and config.json.

The config records the architecture the weights fit and the feature extractor and sentence encoder they were trained
on, so a model is rebuilt from its checkpoint alone and is never silently paired with features it has not seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pipeline.features import complete_identity
from pipeline.model.cmhn import CMHN, CMHNConfig, ensemble, get_preset

CHECKPOINT_VERSION = 1
WEIGHTS, CONFIG = "weights.pt", "config.json"
ARCHITECTURE = ("channels", "kernel", "kernel_sizes", "strides")  # what a preset fixes


class CheckpointError(Exception):
    """A checkpoint that is missing or unreadable."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint made for another preset, feature extractor, sentence encoder or format version."""

    def __init__(self, path: Path, mismatches: list[tuple[str, Any, Any]]) -> None:
        self.path, self.mismatches = path, mismatches
        details = "; ".join(f"{name}: expected {expected!r}, found {found!r}" for name, expected, found in mismatches)
        super().__init__(f"checkpoint {path} does not match: {details}")


def save_checkpoint(
    path: str | os.PathLike,
    model: CMHN,
    extractor: Mapping[str, Any],
    sentence_encoder: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model's weights and config into directory `path` (created if needed; files replaced atomically)."""
    path = Path(path)
    config = {
        "version": CHECKPOINT_VERSION,
        **asdict(model.config),
        "extractor": dict(extractor),
        "sentence_encoder": sentence_encoder,
        "extra": dict(extra or {}),
    }
    text = json.dumps(config, indent=2)  # fails on unserialisable metadata before anything is written
    path.mkdir(parents=True, exist_ok=True)
    _replace(path / WEIGHTS, lambda f: torch.save(model.state_dict(), f))
    _replace(path / CONFIG, lambda f: f.write(text.encode()))
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    extractor: Mapping[str, Any] | None = None,
    sentence_encoder: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[CMHN, dict[str, Any]]:
    """The model, in eval mode (RReLU and dropout are random in training mode), and its config. Each expectation given
    (preset name and its current architecture, extractor fields, sentence encoder) must match the checkpoint, else
    CheckpointMismatch lists every difference."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"no CMHN checkpoint at {path} (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((path / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"corrupt checkpoint config {path / CONFIG}: {error}") from error
    mismatches = _mismatches(config, preset, extractor, sentence_encoder)
    if mismatches:
        raise CheckpointMismatch(path, mismatches)
    try:
        # fields added since a checkpoint was written take their defaults (whiten: none, as before it existed)
        values = {f.name: config[f.name] for f in fields(CMHNConfig) if f.name in config or f.default is MISSING}
        model = CMHN(CMHNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"bad model config in {path / CONFIG}: {error!r}") from error
    try:
        model.load_state_dict(torch.load(path / WEIGHTS, map_location="cpu", weights_only=True))
    except Exception as error:  # torch.load and load_state_dict raise many types for a damaged or foreign file
        raise CheckpointError(f"corrupt or mismatched weights {path / WEIGHTS}: {error}") from error
    return model.to(map_location).eval(), config | {"extractor": complete_identity(config.get("extractor") or {})}


def join_checkpoints(members: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the ensemble of the checkpoints ``members`` (``cmhn.ensemble``) to ``out``. They must have been
    trained on one frame extractor and sentence encoder; each member's own record (its ``extra``) is kept. The
    ensemble is not calibrated: its threshold counts the bits of every member, so it gets its own."""
    loaded = [load_checkpoint(path) for path in members]
    firsts = loaded[0][1]
    for path, (_, config) in zip(members[1:], loaded[1:]):
        for key in ("extractor", "sentence_encoder"):
            if config[key] != firsts[key]:
                raise CheckpointMismatch(Path(path), [(key, firsts[key], config[key])])
    try:
        joined = ensemble([model for model, _ in loaded])
    except ValueError as error:
        raise CheckpointError(f"cannot join {', '.join(map(str, members))}: {error}") from error
    extra = {"members": [{"checkpoint": Path(path).name, **config.get("extra", {})}
                         for path, (_, config) in zip(members, loaded)]}
    return save_checkpoint(out, joined, firsts["extractor"], firsts["sentence_encoder"], extra)


def set_calibration(path: str | os.PathLike, calibration: Mapping[str, Any]) -> None:
    """Record the checkpoint's alert threshold (``calibration["threshold"]``) and how it was chosen in its config:
    the threshold belongs to the weights it was measured with, and standing queries without one use it."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot calibrate {path}: unreadable {CONFIG}: {error}") from error
    config |= {"threshold": int(calibration["threshold"]), "calibration": dict(calibration)}
    text = json.dumps(config, indent=2)
    _replace(path / CONFIG, lambda f: f.write(text.encode()))


def calibrated_threshold(path: str | os.PathLike) -> int | None:
    """The checkpoint's calibrated alert threshold, read from its config alone (no weights), or None."""
    try:
        threshold = json.loads((Path(path) / CONFIG).read_text()).get("threshold")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"cannot read the threshold of checkpoint {path}: {error}") from error
    return threshold if isinstance(threshold, int) and not isinstance(threshold, bool) else None


def _mismatches(
    config: dict[str, Any], preset: str | None, extractor: Mapping[str, Any] | None, sentence_encoder: str | None
) -> list[tuple[str, Any, Any]]:
    expected: dict[str, Any] = {"version": CHECKPOINT_VERSION}
    if preset is not None:
        architecture = asdict(get_preset(preset))
        expected |= {"preset": preset, **{name: _jsonable(architecture[name]) for name in ARCHITECTURE}}
    if sentence_encoder is not None:
        expected["sentence_encoder"] = sentence_encoder
    found = [(name, value, config.get(name)) for name, value in expected.items()]
    if extractor is not None:
        saved = complete_identity(config["extractor"]) if isinstance(config.get("extractor"), dict) else {}
        extractor = complete_identity(dict(extractor))
        found += [(f"extractor.{key}", extractor.get(key), saved.get(key)) for key in sorted({*extractor, *saved})]
    return [(name, value, got) for name, value, got in found if value != got]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _replace(target: Path, write: Callable[[BinaryIO], object]) -> None:
    temporary = target.with_name(target.name + ".tmp")
    with temporary.open("wb") as f:
        write(f)
    os.replace(temporary, target)
