"""Published CMHN checkpoints: trained by a recorded recipe and shipped inside the package, apart from the model code.

Training a model worth alerting with takes an hour of two cores (thousands of rendered videos to extract and learn
from), so, as torchvision ships its weights, the package carries one, which `vmh demo` and `vmh up` serve on a fresh
machine at once. Each is an ordinary checkpoint directory (pipeline.model.checkpoint), its weights stored as float16
to halve their size; its config records the extractor it needs (which the producer adopts), its calibrated
threshold, the commands that trained it and what it measured on a split nothing was tuned on. Nothing here imports
torch, so the `checkpoint` setting can name one cheaply.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
LITE_SYNTH = "lite-synth-v6"  # two lite models, synthetic videos and their backwards copies, 160 px, 2 fps, motion 4x4


def names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def published_checkpoint(name: str = LITE_SYNTH) -> Path:
    """The directory of the published checkpoint `name`."""
    path = ROOT / name
    if not (path / "config.json").is_file() or not (path / "weights.pt").is_file():
        raise FileNotFoundError(f"no published checkpoint {name!r} in {ROOT} (there are: {names() or 'none'}); "
                                "was the package installed without its data?")
    return path


def published_extractor(name: str = LITE_SYNTH) -> dict:
    """The frame extractor the published checkpoint ``name`` was trained on, as its config records it (completed
    with the keys added since): the frame path that serves it."""
    from pipeline.features import recorded_extractor

    return recorded_extractor(published_checkpoint(name))


def checkpoint_location(text: str) -> str:
    """The `checkpoint` setting's value: a checkpoint directory, or the name of a published checkpoint, which an
    existing path of the same name shadows."""
    if text and not Path(text).exists() and text in names():
        return str(published_checkpoint(text))
    return text
