"""Motion features: dense optical flow between a stream's consecutive sampled frames, pooled on a grid.

Frame CNN features say what is where; averaged over a second, they hardly say which way it went, and "moves left"
and "moves right" or "grows" and "shrinks" look the same to them (a linear probe reads the action of a synthetic
event from MobileNetV2 grid features at 0.72, from these flow cells alone at 0.79). This is the second stream of
two-stream action recognition (Simonyan & Zisserman 2014), made cheap: OpenCV's Farneback flow on small grey
frames (about 2 ms a pair on one core at 64 px), then per cell of a g x g grid the mean flow (x, y) in frame sides
per second, independent of frame size and sample rate, and its mean divergence, which is what growing and
shrinking are.

A frame's flow is from the stream's previous sampled frame, so the encoder keeps each stream's last small frame;
a stream's first frame and the first frame after a gap (a reconnect) have no motion (zeros).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.video.source import SampledFrame

FLOW_SIDE = 64  # grey frames are scaled to this square before the flow: motion is coarse, the cost grows as side^2
_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as OpenCV's RGB2GRAY
# Farneback parameters: 3 pyramid levels of scale 0.5 follow a displacement of a quarter of the small frame
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=3, poly_n=5, poly_sigma=1.1, flags=0)


def motion_dim(grid: int) -> int:
    """Features per frame for a g x g grid (0: motion off): x flow, y flow and divergence of every cell."""
    return 3 * grid * grid


class MotionEncoder:
    """Sampled frames of any streams (each in media-time order) -> float32 [N, 3 g^2] flow cells, row by row:
    all cells' x flow, then y flow, then divergence."""

    def __init__(self, grid: int, sample_rate: float) -> None:
        if not (isinstance(grid, int) and grid >= 1) or FLOW_SIDE % grid:
            raise ValueError(f"the motion grid must be a whole number of cells dividing {FLOW_SIDE}, got {grid!r}")
        self.grid, self.sample_rate = grid, float(sample_rate)
        self.dim = motion_dim(grid)
        self._previous: dict[str, np.ndarray] = {}  # each stream's last small grey frame

    def encode(self, frames: Sequence[SampledFrame], rgb: np.ndarray | None = None) -> np.ndarray:
        """``rgb``: the frames' pixels already stacked [N, H, W, 3], as the frame path has them for the CNN."""
        import cv2

        out = np.zeros((len(frames), 3, FLOW_SIDE, FLOW_SIDE), np.float32)
        if not frames:
            return self._pool(out)
        small = _small_grey(np.stack([f.rgb for f in frames]) if rgb is None else rgb)
        for i, frame in enumerate(frames):  # one OpenCV call per frame pair: flow has no batched form
            previous = self._previous.get(frame.stream_id)
            if previous is not None and frame.gap <= 0:
                flow = cv2.calcOpticalFlowFarneback(previous, small[i], None, **_FARNEBACK)
                out[i, :2] = flow.transpose(2, 0, 1)
            self._previous[frame.stream_id] = small[i]
        out[:, :2] *= self.sample_rate / FLOW_SIDE  # pixels per frame pair -> frame sides per second
        out[:, 2] = np.gradient(out[:, 0], axis=2) + np.gradient(out[:, 1], axis=1)
        out[:, 2] *= FLOW_SIDE / self.grid  # per cell side, so a uniform expansion reads the same at any grid
        return self._pool(out)

    def forget(self, stream_id: str) -> None:
        """The stream ended: its next frame, if it comes back, starts without motion."""
        self._previous.pop(stream_id, None)

    def _pool(self, maps: np.ndarray) -> np.ndarray:
        g, cell = self.grid, FLOW_SIDE // self.grid
        cells = maps.reshape(len(maps), 3, g, cell, g, cell).mean((3, 5))
        return cells.reshape(len(maps), self.dim)


def _small_grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, FLOW_SIDE, FLOW_SIDE] luma, area-averaged, for the whole batch at once."""
    x = torch.from_numpy(rgb).float() @ torch.tensor(_GREY)
    x = torch.nn.functional.interpolate(x[:, None], size=(FLOW_SIDE, FLOW_SIDE), mode="area")[:, 0]
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()
