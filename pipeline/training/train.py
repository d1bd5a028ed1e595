"""Train CMHN as the reference does: Adam, one video with all its sentences per step, the summed CMHN loss; or, for
standing queries, a few videos a step with every sentence scored against every video's candidates.

The reference only ever shows a sentence the candidates of its own video, so nothing teaches it to stay far from a
look-alike moment of another video, which is most of what a live stream holds. With ``videos_per_step`` > 1 the
target of sentence i and candidate j of any video of the step is the IoU of j with that video's moments of the same
event (``Sample.events``: another phrasing of the same thing counts), 0 where the event does not happen, and
``negative_weight`` scales the pairs of other videos so their number does not drown the sentence's own video.
A two-way contrastive term (``contrastive_weight``) over the step's code inner products makes each sentence prefer
its moments to every other candidate of the step, and each moment prefer its sentences to the step's others: the
regression alone fits the many easy zeros first and tells look-alikes apart last. Those look-alikes must be in the
step to be told apart: ``step_videos="similar"`` draws each step as a video and the ones whose captions are nearest
its own (on 1,500 synthetic videos, five times the pairs of one colour and shape doing different things that random
steps of four hold).

Each epoch visits the training videos in an order drawn from (seed, epoch), then scores the validation split with
binary codes (R@1 at IoU 0.5); the best epoch's weights are the checkpoint. After every epoch a training-state file
next to the checkpoint records the current weights, Adam's moments, the best score and torch's RNG state, so a
resumed run continues exactly where the interrupted one stopped: same seed, same weights, resumed or not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.features.motion import motion_dim
from pipeline.model import (CMHN, build_cmhn, candidate_spans, cmhn_loss, load_checkpoint, save_checkpoint,
                            smooth_sign, target_iou)
from pipeline.model.checkpoint import calibrated_threshold, set_calibration
from pipeline.training.alerts import calibrate, thresholds_for
from pipeline.training.evaluate import Sample, hashed_recall
from pipeline.training.options import TrainError, TrainOptions

log = logging.getLogger(__name__)

STATE_VERSION = 1
SELECTIONS = {"recall": "R@1,IoU=0.5", "alerts": "alert F1,IoU=0.5"}  # what picks the epoch kept


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_score: float  # validation R@1 at IoU 0.5 of the saved weights
    epochs_run: int  # in this invocation; 0 when a resumed run was already complete
    history: list[dict[str, float]]  # per epoch: epoch, loss (mean per video), val
    threshold: int | None = None  # the alert threshold calibrated on the validation split


def state_path(checkpoint: str | os.PathLike) -> Path:
    """The training-state file that sits next to a checkpoint directory."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".train-state.pt")


def train(
    options: TrainOptions,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    out: str | os.PathLike,
    *,
    extractor: Mapping[str, Any],
    sentence_encoder: str,
    resume: bool = False,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train into checkpoint directory `out` (best validation epoch) and its training-state file.

    Without `resume` an existing run at `out` is started over; with it, the run continues from its state file,
    which must exist and come from the same options (the epoch count may grow)."""
    from tqdm import tqdm

    if not train_samples or not val_samples:
        raise TrainError(f"need training and validation videos, got {len(train_samples)} and {len(val_samples)}")
    options, out = options.resolved(), Path(out)
    device = train_samples[0].video.device
    model = _model(options, train_samples[0], device, motion_dim(int(extractor.get("motion_grid", 0))))
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, fused=True)  # 5x the default's speed on CPU
    run = _run_record(options, train_samples[0], extractor, sentence_encoder)
    start, best_epoch, best_score, history = 0, 0, -1.0, []
    if resume:
        start, best_epoch, best_score, history = _restore(state_path(out), run, model, optimizer, device)
    else:
        if state_path(out).exists():
            log.warning("starting over: %s holds an earlier run (pass --resume to continue it)", state_path(out))
        model.fit_inputs(torch.cat([s.video for s in train_samples]),
                         torch.cat([s.sentence_vectors for s in train_samples]))
    videos, per_step = len(train_samples), options.videos_per_step
    captions = caption_vectors(train_samples) if options.step_videos == "similar" else None
    targets = Targets(model, train_samples)
    extra = dict(extra or {}) | {"seed": options.seed, "lr": options.lr, "epochs": options.epochs,
                                 "videos_per_step": options.videos_per_step, "step_videos": options.step_videos,
                                 "negative_weight": options.negative_weight,
                                 "contrastive_weight": options.contrastive_weight, "select": options.select}

    with tqdm(total=(options.epochs - start) * videos, desc="training", unit="video", disable=not progress) as bar:
        for epoch in range(start + 1, options.epochs + 1):
            model.train()
            total, steps = 0.0, 0
            order = np.random.default_rng([options.seed, epoch]).permutation(videos)
            for group in step_groups(order, per_step, captions):
                target, weight = targets.of(group, options.negative_weight)
                loss = _loss(model, [train_samples[i] for i in group], target, weight, options.contrastive_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item() / len(group), steps + 1
                bar.set_postfix(_postfix(epoch, options.epochs, total / steps, best_score))
                bar.update(len(group))
            score = validation_score(model, val_samples, options.select)
            history.append({"epoch": epoch, "loss": total / steps, "val": score})
            log.info("epoch done", extra={"fields": history[-1]})
            if score > best_score:
                best_epoch, best_score = epoch, score
                save_checkpoint(out, model, extractor, sentence_encoder,
                                extra | {"best_epoch": epoch, f"val {SELECTIONS[options.select]}": score})  # fmt: skip
            bar.set_postfix(_postfix(epoch, options.epochs, total / steps, best_score))
            _save_state(state_path(out), run, epoch, model, optimizer, best_epoch, best_score, history)
    epochs_run = max(options.epochs - start, 0)
    if options.causal and (epochs_run or calibrated_threshold(out) is None):  # only the causal form serves live
        set_calibration(out, calibrate(load_checkpoint(out, map_location=device)[0], val_samples))
    return TrainResult(out, best_epoch, best_score, epochs_run, history, calibrated_threshold(out))


def caption_vectors(samples: Sequence[Sample]) -> np.ndarray:
    """[videos, S]: each video's mean sentence vector, unit length: what its captions are about."""
    vectors = torch.stack([s.sentence_vectors.mean(0) for s in samples]).float().cpu().numpy()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def step_groups(order: np.ndarray, per_step: int, captions: np.ndarray | None = None) -> list[list[int]]:
    """The videos of each step: consecutive runs of ``order``; or, with ``captions`` (``caption_vectors``), each
    next video of the order not yet placed with the ``per_step - 1`` unplaced ones whose captions are nearest its
    own. Random steps rarely hold two videos of one colour and shape doing different things, the negatives a live
    stream is made of; steps of similar captions hold them all the time."""
    if captions is None:
        return [order[first : first + per_step].tolist() for first in range(0, len(order), per_step)]
    free, groups = np.ones(len(order), bool), []
    for seed in order.tolist():
        if not free[seed]:
            continue
        free[seed] = False
        others = np.flatnonzero(free)
        nearest = others[np.argsort(-(captions[others] @ captions[seed]), kind="stable")[: per_step - 1]]
        free[nearest] = False
        groups.append([seed, *nearest.tolist()])
    return groups


def _postfix(epoch: int, epochs: int, loss: float, best: float) -> dict[str, str]:
    """Progress bar fields: the epoch, the epoch's running mean loss, the best validation score so far."""
    return {"epoch": f"{epoch}/{epochs}", "loss": f"{loss:.4g}", "best val": f"{best:.3f}" if best >= 0 else "-"}


def _model(options: TrainOptions, sample: Sample, device: torch.device, motion: int) -> CMHN:
    torch.manual_seed(options.seed)
    dims = {"video_dim": sample.video.shape[1], "sentence_dim": sample.sentence_vectors.shape[1], "motion_dim": motion}
    return build_cmhn(options.preset, bits=options.bits, causal=options.causal, whiten=options.whiten,
                      **dims).to(device)


def validation_score(model: CMHN, val_samples: Sequence[Sample], select: str) -> float:
    """The score that picks the epoch kept: R@1 at IoU 0.5 as the reference does, or the best alert F1 over a
    coarse threshold sweep of the live logic (what a standing query needs)."""
    if select == "recall":
        return hashed_recall(model, val_samples)
    return calibrate(model.eval(), val_samples, thresholds=thresholds_for(model.config.bits, points=16))["f1"]


class Targets:
    """S and the pair weights of any group of training videos: sentence i of video a against candidate j of video
    b is the IoU of j with b's moments of i's event. Blocks are computed once and kept for the run."""

    def __init__(self, model: CMHN, samples: Sequence[Sample]) -> None:
        config = model.config
        self.samples = samples
        self.spans = [candidate_spans(len(s.video), config.kernel_sizes, config.strides) for s in samples]
        self.events = [s.event_spans() for s in samples]
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}

    def block(self, a: int, b: int) -> torch.Tensor:
        """[M_a, N_b] targets of video a's sentences against video b's candidates."""
        if (a, b) not in self._blocks:
            sample, events = self.samples[a], self.events[b]
            target = torch.zeros(len(sample.sentences), len(self.spans[b]))
            rows = [i for i, event in enumerate(sample.kinds) if event in events]
            if rows:
                target[rows] = target_iou([events[sample.kinds[i]] for i in rows], self.spans[b]).to(target)
            self._blocks[a, b] = target.to(sample.video)
        return self._blocks[a, b]

    def of(self, group: Sequence[int], negative_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S, weights) of a group; the weights are None, the published loss, for a group of one video."""
        target = torch.cat([torch.cat([self.block(a, b) for b in group], dim=1) for a in group])
        if len(group) == 1:
            return target, None
        weight = torch.cat([torch.cat([torch.full_like(self.block(a, b), 1.0 if a == b else negative_weight)
                                       for b in group], dim=1) for a in group])
        return target, weight


def _loss(model: CMHN, group: Sequence[Sample], target: torch.Tensor, weight: torch.Tensor | None,
          contrastive_weight: float = 0.0) -> torch.Tensor:
    h_v = smooth_sign(torch.cat([model.ven(sample.video) for sample in group]))
    h_s = smooth_sign(model.qen(torch.cat([sample.sentence_vectors for sample in group])))
    loss = cmhn_loss(h_s, h_v, target, weight)
    if contrastive_weight:
        loss = loss + contrastive_weight * contrastive_loss(h_s @ h_v.T, target >= 0.5, h_s.shape[1])
    return loss


TEMPERATURE = 1 / 16  # of code inner products, as a share of B (they span -B..B): 8 for 128 bits


def contrastive_loss(scores: torch.Tensor, positive: torch.Tensor, bits: int) -> torch.Tensor:
    """Multi-positive InfoNCE both ways over inner products [M, N]: each sentence against all candidates of the
    step, and each candidate that covers an event against all sentences, the ones of its event being positive."""
    logits = scores / (TEMPERATURE * bits)
    masked = logits.masked_fill(~positive, float("-inf"))
    total = logits.new_zeros(())
    for dim in (1, 0):
        rows = positive.any(dim=dim)
        if rows.any():
            gain = torch.logsumexp(masked, dim=dim) - torch.logsumexp(logits, dim=dim)
            total = total - gain[rows].sum()
    return total


def _run_record(
    options: TrainOptions, sample: Sample, extractor: Mapping[str, Any], sentence_encoder: str
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (everything but the epoch count)."""
    return {
        **{k: v for k, v in asdict(options).items() if k != "epochs"},
        "video_dim": int(sample.video.shape[1]),
        "sentence_dim": int(sample.sentence_vectors.shape[1]),
        "extractor": dict(extractor),
        "sentence_encoder": sentence_encoder,
    }


def _save_state(
    path: Path,
    run: dict[str, Any],
    epoch: int,
    model: CMHN,
    optimizer: torch.optim.Optimizer,
    best_epoch: int,
    best_score: float,
    history: list[dict[str, float]],
) -> None:
    state = {
        "version": STATE_VERSION,
        "run": run,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_epoch": best_epoch,
        "best_score": best_score,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _restore(
    path: Path, run: dict[str, Any], model: CMHN, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, int, float, list[dict[str, float]]]:
    """Load a state file into model and optimizer; (epoch, best_epoch, best_score, history)."""
    if not path.is_file():
        raise TrainError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise TrainError(f"cannot resume: unreadable training state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainError(f"cannot resume: {path} is not a version {STATE_VERSION} training state")
    saved = state["run"]
    differs = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in run.items() if saved.get(k) != v]
    if differs:
        raise TrainError(f"cannot resume {path}: the run differs in {'; '.join(differs)}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return state["epoch"], state["best_epoch"], state["best_score"], state["history"]
