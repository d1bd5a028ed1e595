"""The temporal convolutional network (Bai et al. 2018) at the bottom of the CMHN video encoder.

Two forms share one module layout and one set of weights. The published form pads every dilated conv on both sides
(the reference code comments its Chomp1d out), so an output sees seconds ahead of it; the causal form pads
(k - 1) * d on the left only, so output t reads inputs <= t and can be computed as the seconds arrive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class TemporalBlock(nn.Module):
    """Two weight-normed dilated convs with RReLU and dropout, plus a residual (1x1 conv when widths differ)."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float, causal: bool) -> None:
        super().__init__()
        history = (kernel_size - 1) * dilation
        self.padding = (history, 0) if causal else (history // 2, history - history // 2)
        self.conv1 = _weight_normed(nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation))
        self.relu1 = nn.RReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = _weight_normed(nn.Conv1d(n_out, n_out, kernel_size, dilation=dilation))
        self.relu2 = nn.RReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        if self.downsample is not None:
            nn.init.normal_(self.downsample.weight, 0.0, 0.01)
        self.relu = nn.RReLU()

    @property
    def history(self) -> int:
        """Columns before t that one conv reads for output t in the causal form: (k - 1) * d."""
        return sum(self.padding)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout1(self.relu1(self.conv1(F.pad(x, self.padding))))
        out = self.dropout2(self.relu2(self.conv2(F.pad(out, self.padding))))
        return self.relu(out + self.residual(x))


class TemporalConvNet(nn.Module):
    """TemporalBlocks with dilation 2**i at level i; [N, C_in, T] -> [N, channels[-1], T]."""

    def __init__(
        self, num_inputs: int, channels: tuple[int, ...], kernel_size: int, dropout: float, causal: bool
    ) -> None:
        super().__init__()
        widths = (num_inputs, *channels)
        self.blocks = nn.Sequential(
            *(TemporalBlock(widths[i], widths[i + 1], kernel_size, 2**i, dropout, causal) for i in range(len(channels)))
        )

    @property
    def receptive_field(self) -> int:
        """Seconds of input one output reads: 1 + sum over blocks of 2 (k - 1) d (two convs a block)."""
        return 1 + sum(2 * block.history for block in self.blocks)

    @property
    def look_ahead(self) -> int:
        """Seconds after t that output t reads: 0 when causal, 30 for the published TACoS network."""
        return sum(2 * block.padding[1] for block in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _weight_normed(conv: nn.Conv1d) -> nn.Conv1d:
    # Initialise before wrapping: the reference's normal_(0, 0.01) on the computed weight is overwritten by g * v/||v||.
    nn.init.normal_(conv.weight, 0.0, 0.01)
    return weight_norm(conv)
