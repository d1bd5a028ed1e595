"""What a training run depends on, apart from its data: kept free of torch so the CLI can show the defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace


class TrainError(Exception):
    """A training run that cannot start or resume as asked."""


@dataclass(frozen=True)
class TrainOptions:
    """What a run depends on; bits, epochs, lr and whiten default to the preset's."""

    preset: str = "lite"
    bits: int | None = None
    causal: bool = True
    epochs: int | None = None
    lr: float | None = None
    seed: int = 0
    videos_per_step: int = 1
    negative_weight: float = 1.0
    event_weight: float = 0.0
    contrastive_weight: float = 0.0
    whiten: int | None = None  # dims the video features are PCA-whitened to; None: the preset's, 0: none

    def __post_init__(self) -> None:
        if self.videos_per_step < 1 or not self.negative_weight >= 0 or not self.event_weight >= 0:
            raise TrainError(f"need videos_per_step >= 1, negative_weight >= 0 and event_weight >= 0, got "
                             f"{self.videos_per_step}, {self.negative_weight} and {self.event_weight}")

    def resolved(self) -> TrainOptions:
        from pipeline.model import get_preset

        config = get_preset(self.preset)
        return replace(
            self,
            bits=config.bits if self.bits is None else self.bits,
            epochs=config.epochs if self.epochs is None else self.epochs,
            lr=config.lr if self.lr is None else self.lr,
            whiten=config.whiten if self.whiten is None else self.whiten,
        )
