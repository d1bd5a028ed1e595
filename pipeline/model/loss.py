"""CMHN training objective: relaxed codes whose inner products match B times the temporal IoU.

sign() has no gradient, so training uses a smooth surrogate on the L2-normalised, sqrt(B)-scaled pre-sign values and
adds a quantisation term pulling the relaxed codes towards +-1, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def smooth_sign(x: torch.Tensor) -> torch.Tensor:
    """h = f(sqrt(B) x / ||x||) over the last dim, f(u) = ln(1 + 3.92155 u^2) / (1.59362 u + 1e-7): odd up to the
    1e-7, peaking at |f(+-1)| ~= 1 and tending to 0 far out; the scaling makes the RMS of u exactly 1."""
    u = math.sqrt(x.shape[-1]) * x / x.norm(dim=-1, keepdim=True)
    return torch.log1p(3.92155 * u * u) / (1.59362 * u + 1e-7)


def temporal_iou(spans_a: torch.Tensor | np.ndarray, spans_b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pairwise IoU [N, M] of intervals [N, 2] and [M, 2] given as (start, end); 0 where both are empty."""
    a, b = _spans(spans_a), _spans(spans_b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_min(0)
    union = (a[:, None, 1] - a[:, None, 0]) + (b[None, :, 1] - b[None, :, 0]) - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(inter.dtype).tiny), 0.0)


def target_iou(
    ground_truths: Sequence[torch.Tensor | np.ndarray], candidates: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """S [M, N]: for each of M sentences the best IoU of any of its ground-truth spans [g_i, 2] with each candidate."""
    counts = torch.tensor([len(spans) for spans in ground_truths])
    if len(counts) == 0 or int(counts.min()) == 0:
        raise ValueError("every sentence needs at least one ground-truth span")
    iou = temporal_iou(torch.cat([_spans(spans) for spans in ground_truths]), candidates)
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return iou.new_zeros(len(counts), iou.shape[1]).scatter_reduce_(0, owner[:, None].expand_as(iou), iou, "amax")


def cmhn_loss(h_s: torch.Tensor, h_v: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """L1 + L2 over relaxed sentence codes [M, B], candidate codes [N, B] and targets S [M, N], summed:
    L1 = sum_ij (h_s,i . h_v,j - B S_ij)^2, L2 = sum ||h - sign(h)||^2 over both modalities (sign detached)."""
    bits = h_s.shape[-1]
    if h_s.dim() != 2 or h_v.dim() != 2 or h_v.shape[1] != bits or iou.shape != (h_s.shape[0], h_v.shape[0]):
        raise ValueError(
            f"expected h_s [M, B], h_v [N, B], iou [M, N]; got {list(h_s.shape)}, {list(h_v.shape)}, {list(iou.shape)}"
        )
    l1 = (h_s @ h_v.T - bits * iou).square().sum()
    l2 = (h_s - h_s.sign().detach()).square().sum() + (h_v - h_v.sign().detach()).square().sum()
    return l1 + l2


def _spans(spans: torch.Tensor | np.ndarray) -> torch.Tensor:
    spans = torch.as_tensor(spans)
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must be [N, 2] (start, end), got {list(spans.shape)}")
    return spans if spans.is_floating_point() else spans.to(torch.get_default_dtype())
