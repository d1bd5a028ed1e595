"""CMHN training objective: relaxed codes whose inner products match B times the temporal IoU.

sign() has no gradient, so training uses a smooth surrogate on the L2-normalised, sqrt(B)-scaled pre-sign values and
adds a quantisation term pulling the relaxed codes towards +-1, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.spans import ground_truth_iou


def smooth_sign(x: torch.Tensor) -> torch.Tensor:
    """h = f(sqrt(B) x / ||x||) over the last dim, f(u) = ln(1 + 3.92155 u^2) / (1.59362 u + 1e-7): odd up to the
    1e-7, peaking at |f(+-1)| ~= 1 and tending to 0 far out; the scaling makes the RMS of u exactly 1."""
    u = math.sqrt(x.shape[-1]) * x / x.norm(dim=-1, keepdim=True)
    return torch.log1p(3.92155 * u * u) / (1.59362 * u + 1e-7)


def target_iou(
    ground_truths: Sequence[torch.Tensor | np.ndarray], candidates: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """S [M, N]: for each of M sentences the best IoU of any of its ground-truth spans [g_i, 2] with each candidate."""
    truths = [np.asarray(spans.cpu() if isinstance(spans, torch.Tensor) else spans) for spans in ground_truths]
    candidates = np.asarray(candidates.cpu() if isinstance(candidates, torch.Tensor) else candidates)
    return torch.from_numpy(ground_truth_iou(candidates, truths)).to(torch.get_default_dtype())


def cmhn_loss(h_s: torch.Tensor, h_v: torch.Tensor, iou: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 + L2 over relaxed sentence codes [M, B], candidate codes [N, B] and targets S [M, N], summed:
    L1 = sum_ij w_ij (h_s,i . h_v,j - B S_ij)^2, L2 = sum ||h - sign(h)||^2 over both modalities (sign detached).
    The weights w [M, N] (1 without them, as published) let many cross-video negatives count as much as the
    sentence's own video rather than drown it."""
    bits = h_s.shape[-1]
    if h_s.dim() != 2 or h_v.dim() != 2 or h_v.shape[1] != bits or iou.shape != (h_s.shape[0], h_v.shape[0]):
        raise ValueError(
            f"expected h_s [M, B], h_v [N, B], iou [M, N]; got {list(h_s.shape)}, {list(h_v.shape)}, {list(iou.shape)}"
        )
    if weight is not None and weight.shape != iou.shape:
        raise ValueError(f"expected weight {list(iou.shape)}, got {list(weight.shape)}")
    l1 = (h_s @ h_v.T - bits * iou).square()
    l1 = (l1 if weight is None else l1 * weight).sum()
    l2 = (h_s - h_s.sign().detach()).square().sum() + (h_v - h_v.sign().detach()).square().sum()
    return l1 + l2
