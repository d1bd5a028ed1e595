"""What a training run depends on, apart from its data: kept free of torch so the CLI can show the defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace


STEP_VIDEOS = ("random", "similar")


class TrainError(Exception):
    """A training run that cannot start or resume as asked."""


@dataclass(frozen=True)
class TrainOptions:
    """What a run depends on; bits, epochs, lr and whiten default to the preset's.

    The defaults train for standing queries (alerts): four videos a step, every sentence against every video's
    candidates, other videos' pairs at a quarter weight, the two-way contrastive term, the epoch of best validation
    alert F1 kept. ``TrainOptions.published()`` is the reference's recipe (one video a step, the loss alone, best
    R@1 kept), for comparing with the paper."""

    preset: str = "lite"
    bits: int | None = None
    causal: bool = True
    epochs: int | None = None
    lr: float | None = None
    seed: int = 0
    videos_per_step: int = 4
    step_videos: str = "random"  # how a step's videos are drawn: "random", or "similar" captions (look-alikes)
    negative_weight: float = 0.25
    contrastive_weight: float = 3000.0
    select: str = "alerts"  # what picks the epoch kept: "recall" (R@1, as the reference) or "alerts" (alert F1)
    whiten: int | None = None  # dims the video features are PCA-whitened to; None: the preset's, 0: none

    def __post_init__(self) -> None:
        if self.videos_per_step < 1 or not self.negative_weight >= 0 or not self.contrastive_weight >= 0:
            raise TrainError(f"need videos_per_step >= 1 and non-negative weights, got {self.videos_per_step}, "
                             f"{self.negative_weight} and {self.contrastive_weight}")
        if self.step_videos not in STEP_VIDEOS:
            raise TrainError(f"step_videos must be one of {', '.join(STEP_VIDEOS)}, got {self.step_videos!r}")
        if self.select not in ("recall", "alerts"):
            raise TrainError(f"select must be 'recall' or 'alerts', got {self.select!r}")

    @classmethod
    def published(cls, **changes) -> TrainOptions:
        """The CMHN reference's recipe: one video a step, the summed loss alone, the best validation R@1 kept."""
        return cls(**{"videos_per_step": 1, "negative_weight": 1.0, "contrastive_weight": 0.0, "select": "recall",
                      "whiten": 0, **changes})

    def resolved(self) -> TrainOptions:
        from pipeline.model import get_preset

        config = get_preset(self.preset)
        return replace(
            self,
            bits=config.bits if self.bits is None else self.bits,
            epochs=config.epochs if self.epochs is None else self.epochs,
            lr=config.lr if self.lr is None else self.lr,
            whiten=config.whiten if self.whiten is None else self.whiten,
            select=self.select if self.causal else "recall",  # alerts come from the causal form only
        )
