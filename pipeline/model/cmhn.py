"""CMHN (Hu et al., TIP 2021): a video encoder (VEN) and a sentence encoder (QEN) into one B-bit Hamming space.

VEN runs a TCN over one feature vector per second, then one Conv1d head per candidate length k (stride s); output j
of head (k, s) is the moment [j*s, j*s + k) seconds. QEN is a three-layer MLP over frozen sentence vectors. Both end
in pre-sign values; sign() gives the codes. Presets copy the reference code; `lite` is ours, small enough to train on
two CPU cores in minutes for 20-60 s videos with 2-15 s events.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.model.tcn import TemporalConvNet


@dataclass(frozen=True)
class CMHNConfig:
    """Architecture and training schedule. Presets fix everything after the input layers; V and S are settings."""

    preset: str
    bits: int
    channels: tuple[int, ...]
    kernel: int
    kernel_sizes: tuple[int, ...]
    strides: tuple[int, ...]
    dropout: float
    lr: float
    epochs: int
    video_dim: int = 1280
    sentence_dim: int = 384
    causal: bool = True
    whiten: int = 0  # > 0: video features PCA-whitened to this many dims (at most V), sentences standardised
    motion_dim: int = 0  # the last video features are motion (flow cells): standardised beside the PCA, not in it
    members: int = 1  # > 1: that many CMHNs trained apart, their codes side by side (bits is the sum; see ensemble)

    def __post_init__(self) -> None:
        if self.bits <= 0 or self.bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8 (codes are packed into bytes), got {self.bits}")
        if len(self.kernel_sizes) != len(self.strides) or not self.kernel_sizes:
            raise ValueError(f"need one stride per moment length, got {self.kernel_sizes} and {self.strides}")
        if min(self.kernel_sizes) < 1 or min(self.strides) < 1 or self.kernel < 1 or not self.channels:
            raise ValueError(f"kernel sizes, strides, the TCN kernel and channels must be positive: {self}")
        if self.video_dim < 1 or self.sentence_dim < 1:
            raise ValueError(f"video_dim and sentence_dim must be positive, got {self.video_dim}, {self.sentence_dim}")
        if self.whiten < 0:
            raise ValueError(f"whiten must be >= 0 dims, got {self.whiten}")
        if not 0 <= self.motion_dim < self.video_dim:
            raise ValueError(f"motion_dim must be in [0, video_dim), got {self.motion_dim} of {self.video_dim}")
        if self.members < 1 or self.bits % (8 * self.members):
            raise ValueError(f"an ensemble of {self.members} needs bits a multiple of {8 * self.members}, got {self.bits}")

    def member(self) -> CMHNConfig:
        """The config of one member of an ensemble (of the model itself when it has one member)."""
        return replace(self, bits=self.bits // self.members, members=1)

    @property
    def tcn_input(self) -> int:
        """Width of what the TCN reads: the whitened appearance (at most its width) and the motion features, or the
        features themselves."""
        appearance = self.video_dim - self.motion_dim
        return min(self.whiten, appearance) + self.motion_dim if self.whiten else self.video_dim


PRESETS: dict[str, CMHNConfig] = {
    "tacos": CMHNConfig(
        preset="tacos", bits=128, channels=(2048, 1024, 512, 256), kernel=3,
        kernel_sizes=(1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 19, 23),
        strides=(1,) * 13 + (2,),
        dropout=0.3, lr=1e-4, epochs=1024,
    ),
    "activitynet": CMHNConfig(
        preset="activitynet", bits=256, channels=(448, 416, 384, 352, 320, 288, 256), kernel=7,
        kernel_sizes=(1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 19, 23, 28, 34, 41, 50, 61, 75, 92, 113, 139, 171, 211),
        strides=(1,) * 13 + (2, 2, 3, 4, 4, 6, 7, 9, 11, 13, 17, 21),
        dropout=0.3, lr=1.3e-3, epochs=32,
    ),
    "lite": CMHNConfig(
        preset="lite", bits=128, channels=(256, 256), kernel=3,
        kernel_sizes=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16),
        strides=(1,) * 10 + (2, 2),
        dropout=0.1, lr=3e-4, epochs=30, whiten=256,
    ),
}  # fmt: skip


def get_preset(name: str) -> CMHNConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown CMHN preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def candidate_spans(num_seconds: int, kernel_sizes: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """The moments [start, end) in seconds [N, 2] int64 that VEN scores for a video of num_seconds, in its order:
    head by head, the ends x in range(k, T + 1, s); heads with k > T yield none."""
    spans = []
    for k, s in zip(kernel_sizes, strides):
        ends = np.arange(k, num_seconds + 1, s, dtype=np.int64)
        spans.append(np.stack([ends - k, ends], axis=1))
    return np.concatenate(spans)


def moments_ending_at(second: int, kernel_sizes: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """How many candidates end at ``second`` (become final when it arrives): one per head with k <= second and
    (second - k) % s == 0."""
    k, s = np.asarray(kernel_sizes), np.asarray(strides)
    return int(np.count_nonzero((k <= second) & ((second - k) % s == 0)))


class Whitening(nn.Module):
    """x -> (x - mean) @ projection: a fixed linear map fitted on training inputs, kept as buffers so that a
    checkpoint carries its own input preprocessing. Frame features of one kind of scene differ in a few directions
    of small variance (the colour of a shape, its place) under a large common part; whitening gives those directions
    unit scale, so training does not spend its first epochs finding them. Identity until fitted."""

    def __init__(self, dim: int, out: int | None = None) -> None:
        super().__init__()
        out = dim if out is None else out
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("projection", torch.eye(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.projection

    @torch.no_grad()
    def fit_pca(self, x: torch.Tensor, ridge: float = 1e-3, standardised: int = 0) -> None:
        """PCA whitening to ``projection``'s width: each principal component over its standard deviation, plus
        ``ridge`` times the largest, so near-empty directions are not blown up; with fewer inputs than that width
        the components past their rank stay zero. The last ``standardised`` dims (motion, whose variance is too
        small to survive a PCA of the whole) are kept apart: standardised (with the same ridge) into the last
        columns. Seeded apart from
        the caller's RNG (the randomized PCA draws from it), so fitting changes nothing else in a seeded run."""
        x = x.to(self.mean)
        self.mean.copy_(x.mean(0))
        head, width = x.shape[1] - standardised, self.projection.shape[1] - standardised
        rank = min(width, len(x), head)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, s, v = torch.pca_lowrank(x[:, :head] - self.mean[:head], q=rank, center=False, niter=4)
        std = s / max(len(x) - 1, 1) ** 0.5
        self.projection.zero_()
        self.projection[:head, :rank] = v / (std + ridge * std[0])
        if standardised:
            tail = x[:, head:].std(0)
            self.projection[head:, width:] = torch.diag(1 / (tail + ridge * tail.max()))

    @torch.no_grad()
    def fit_standard(self, x: torch.Tensor, eps: float = 1e-3) -> None:
        """Per-dimension standardisation (diagonal ``projection``): for inputs with fewer samples than dims."""
        x = x.to(self.mean)
        self.mean.copy_(x.mean(0))
        self.projection.copy_(torch.diag(1 / (x.std(0) + eps)))


class VEN(nn.Module):
    """Video encoder: per-second features [T, V] -> pre-sign codes of all candidate moments [N, B]."""

    def __init__(self, config: CMHNConfig) -> None:
        super().__init__()
        width = config.channels[-1]
        self.video_dim = config.video_dim
        self.kernel_sizes, self.strides = config.kernel_sizes, config.strides
        self.whiten = Whitening(config.video_dim, config.tcn_input) if config.whiten else nn.Identity()
        self.tcn = TemporalConvNet(config.tcn_input, config.channels, config.kernel, config.dropout, config.causal)
        self.heads = nn.ModuleList(
            nn.Conv1d(width, width, k, stride=s) for k, s in zip(self.kernel_sizes, self.strides)
        )
        bits = config.bits
        self.net = nn.Sequential(nn.RReLU(), nn.Linear(width, bits), nn.RReLU(), nn.Linear(bits, bits))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """[T, V] -> [N, B] (or [batch, T, V] -> [batch, N, B]), rows in candidate_spans(T, ...) order."""
        width = self.video_dim
        if video.dim() not in (2, 3) or video.shape[-1] != width:
            raise ValueError(f"expected video features [T, {width}] or [batch, T, {width}], got {list(video.shape)}")
        num_seconds, shortest = video.shape[-2], min(self.kernel_sizes)
        if num_seconds < shortest:
            raise ValueError(f"a {num_seconds} s video is shorter than the shortest moment ({shortest} s)")
        video = self.whiten(video)
        feed = self.tcn(video.transpose(-1, -2) if video.dim() == 3 else video.T[None])
        out = torch.cat([head(feed) for k, head in zip(self.kernel_sizes, self.heads) if k <= num_seconds], dim=2)
        out = self.net(out.transpose(1, 2))
        return out if video.dim() == 3 else out[0]


class QEN(nn.Sequential):
    """Sentence encoder: frozen sentence vectors [M, S] -> pre-sign codes [M, B]."""

    def __init__(self, config: CMHNConfig) -> None:
        super().__init__(
            *([Whitening(config.sentence_dim)] if config.whiten else []),
            nn.Linear(config.sentence_dim, 512),
            nn.RReLU(),
            nn.Linear(512, 256),
            nn.RReLU(),
            nn.Linear(256, config.bits),
        )


class Members(nn.ModuleList):
    """The encoders of an ensemble's members side by side: one input, their pre-sign codes concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([encoder(x) for encoder in self], dim=-1)


class CMHN(nn.Module):
    """The two encoders and the config they were built from. With ``config.members`` > 1 each encoder is that many
    members' side by side (``ensemble``)."""

    def __init__(self, config: CMHNConfig) -> None:
        super().__init__()
        self.config = config
        member = config.member()
        self.ven = VEN(member) if config.members == 1 else Members(VEN(member) for _ in range(config.members))
        self.qen = QEN(member) if config.members == 1 else Members(QEN(member) for _ in range(config.members))

    @property
    def vens(self) -> list[VEN]:
        """Each member's video encoder (the model's own when it has one member)."""
        return list(self.ven) if isinstance(self.ven, Members) else [self.ven]

    def fit_inputs(self, videos: torch.Tensor, sentences: torch.Tensor) -> None:
        """Fit the input whitening (when the config asks for it) on training features [sum T, V] and sentence
        vectors [M, S]; sentences are few, so they are only standardised."""
        if self.config.members > 1:
            raise ValueError("an ensemble is not trained as one: train its members, then join them (ensemble)")
        if self.config.whiten:
            self.ven.whiten.fit_pca(videos, standardised=self.config.motion_dim)
            self.qen[0].fit_standard(sentences)


def ensemble(models: Sequence[CMHN]) -> CMHN:
    """CMHNs trained apart (other seeds or data) on one architecture, frame extractor and sentence encoder, joined
    into one whose codes are theirs side by side: a sentence and a moment are as far apart as the sum of the
    members' Hamming distances. Members err on different look-alikes, so the sum separates what one code confuses
    (two members: alert F1 0.70 to 0.75 on the synthetic test splits, README "Alert quality")."""
    configs = [model.config for model in models]
    if len(configs) < 2 or any(c.members != 1 for c in configs):
        raise ValueError("an ensemble joins two or more single models")
    differs = sorted(f.name for f in fields(CMHNConfig) if f.name not in ("lr", "epochs")
                     and len({repr(getattr(c, f.name)) for c in configs}) > 1)
    if differs:
        raise ValueError(f"ensemble members must share their architecture and inputs; they differ in {differs}")
    joined = CMHN(replace(configs[0], bits=sum(c.bits for c in configs), members=len(configs)))
    joined.to(next(models[0].parameters()))  # the members' device and dtype, before their weights are copied in
    for side in ("ven", "qen"):
        for target, model in zip(getattr(joined, side), models):
            target.load_state_dict(getattr(model, side).state_dict())
    return joined.eval()


def build_cmhn(
    preset: str, *, video_dim: int = 1280, sentence_dim: int = 384, bits: int | None = None, causal: bool = True,
    whiten: int | None = None, motion_dim: int = 0,
) -> CMHN:
    """A freshly initialised CMHN of a preset (input whitening as the preset's unless given; ``motion_dim``: the
    extractor's motion tail); load weights with pipeline.model.checkpoint."""
    config = get_preset(preset)
    bits = config.bits if bits is None else bits
    whiten = config.whiten if whiten is None else whiten
    return CMHN(replace(config, video_dim=video_dim, sentence_dim=sentence_dim, bits=bits, causal=causal,
                        whiten=whiten, motion_dim=motion_dim))
