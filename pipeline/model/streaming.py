"""Exact incremental inference of the causal VEN over many live streams at once (fast-WaveNet caching).

Per stream the encoder keeps, for every dilated conv, the last (k - 1) * d columns of that conv's input (zeros at the
start are exactly the causal zero padding), the last K_max - 1 TCN outputs for the moment heads, and the number of
seconds seen. A new second appends one column per layer, so a step costs one TCN column per stream, and every layer
runs once for all streams of the step. Its moments equal a full causal VEN pass over the stream's whole history.
An ensemble's members each keep their own caches; their codes are joined per moment.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipeline.codes.packing import pack_signs
from pipeline.model.cmhn import CMHN, VEN, CMHNConfig


class Moment(NamedTuple):
    """Candidate moment [start, end) in seconds of its stream, final once second `end` has arrived."""

    stream_id: str
    start: int
    end: int
    values: np.ndarray  # [B] pre-sign VEN output, in the model's dtype
    code: np.ndarray  # [B / 8] uint8, pack_signs(values)


class StreamStateError(ValueError):
    """A serialised stream state or a rebuild window that cannot give this encoder's exact outputs."""


class StreamingEncoder:
    """Causal VEN over live streams: feed one second of features per stream, get the moments that became final.
    It copies the model's weights when built, so later training does not reach it."""

    def __init__(self, model: CMHN, device: torch.device | str = "cpu") -> None:
        if not model.config.causal:
            raise ValueError("streaming needs the causal form of CMHN (build_cmhn(..., causal=True))")
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.video_dim = model.config.video_dim
        self.vens = [_inference_copy(ven, model.config.member(), self.dtype).to(self.device) for ven in model.vens]
        self._kernels, self._strides = np.array(model.config.kernel_sizes), np.array(model.config.strides)
        blocks = self.vens[0].tcn.blocks
        shapes = [(conv.in_channels, block.history) for block in blocks for conv in (block.conv1, block.conv2)]
        shapes.append((model.config.channels[-1], int(self._kernels.max()) - 1))
        shapes *= len(self.vens)  # each member's caches in turn
        self._caches = [torch.zeros(0, *shape, dtype=self.dtype, device=self.device) for shape in shapes]
        self._seconds = np.zeros(0, dtype=np.int64)
        self._rows: dict[str, int] = {}
        self._free: list[int] = []

    @property
    def receptive_field(self) -> int:
        """Seconds of history that determine all future moments: (R_tcn - 1) + (K_max - 1).

        A TCN output at t reads activations of every layer at seconds >= t - (R_tcn - 1), and a moment ending at x reads
        TCN outputs >= x - K_max; so moments ending after r read nothing before r - receptive_field, and the zeros a
        replay from zero state at r - receptive_field leaves in place of older activations are never read.
        """
        return self.vens[0].tcn.receptive_field - 1 + int(self._kernels.max()) - 1

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def next_second(self, stream_id: str) -> int:
        """The second of the stream whose features step() expects next (0 for a stream not seen yet)."""
        return int(self._seconds[self._rows[stream_id]]) if stream_id in self._rows else 0

    @torch.no_grad()
    def step(self, stream_ids: list[str], features: torch.Tensor | np.ndarray) -> list[Moment]:
        """Advance each stream by one second (features [N, V], row i for stream_ids[i]; unseen ids start at second 0).
        Returns the moments that end at that second, grouped by stream in input order, heads in preset order."""
        if len(set(stream_ids)) != len(stream_ids):
            raise ValueError("a step takes at most one second per stream; stream ids repeat")
        columns = self._features(features, len(stream_ids))
        if not stream_ids:
            return []
        rows = np.array([self._rows[s] if s in self._rows else self._allocate(s) for s in stream_ids])
        windows = self._advance(torch.from_numpy(rows).to(self.device), columns[:, None, :])
        self._seconds[rows] += 1
        return self._moments(stream_ids, self._seconds[rows], windows)

    @torch.no_grad()
    def rebuild(self, stream_id: str, features_tail: torch.Tensor | np.ndarray, next_second: int) -> None:
        """Restore a stream from the features of its last W seconds (ending before next_second) by replaying them
        from zero state. Exact when W >= receptive_field or the tail is the whole stream (W == next_second)."""
        tail = self._features(features_tail)
        needed = min(next_second, self.receptive_field)
        if len(tail) > next_second or len(tail) < needed:
            raise StreamStateError(
                f"stream {stream_id!r}: rebuilding before second {next_second} needs the last {needed} seconds of "
                f"features (at most {next_second}), got {len(tail)}"
            )
        self.drop(stream_id)
        row = self._allocate(stream_id)
        if needed:
            self._advance(torch.tensor([row], device=self.device), tail[None, len(tail) - needed :])
        self._seconds[row] = next_second

    def drop(self, stream_id: str) -> None:
        """Forget a stream (no-op for unknown ids); its row is reused by the next new stream."""
        row = self._rows.pop(stream_id, None)
        if row is not None:
            self._free.append(row)

    def state_dict_for(self, stream_id: str) -> bytes:
        """The stream's state (second count and caches) as bytes for load_state; KeyError for unknown ids."""
        row = self._rows[stream_id]
        caches = [cache[row].to("cpu", copy=True) for cache in self._caches]
        state = {"seconds": int(self._seconds[row]), "caches": caches}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    @torch.no_grad()
    def load_state(self, stream_id: str, data: bytes) -> None:
        """Restore (or create) a stream from state_dict_for bytes of an encoder of the same architecture."""
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
            seconds, caches = int(state["seconds"]), list(state["caches"])
        except Exception as error:  # torch.load raises many types for foreign bytes
            raise StreamStateError(f"stream {stream_id!r}: unreadable state: {error}") from error
        expected = [tuple(cache.shape[1:]) for cache in self._caches]
        found = [tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__ for cache in caches]
        if found != expected or seconds < 0:
            raise StreamStateError(
                f"stream {stream_id!r}: state of another architecture: caches {found} at second {seconds}, "
                f"this encoder keeps {expected}"
            )
        self.drop(stream_id)
        row = self._allocate(stream_id)
        for cache, saved in zip(self._caches, caches):
            cache[row] = saved.to(cache)
        self._seconds[row] = seconds

    def _advance(self, rows: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
        """Push L new seconds of features [N, L, V] through each member's TCN for streams `rows`; each member's last
        K_max - 1 + L TCN outputs [N, C, K_max - 1 + L] come back for its heads."""
        caches = iter(range(len(self._caches)))
        windows = []
        for ven in self.vens:
            x = ven.whiten(features).transpose(1, 2)
            for block in ven.tcn.blocks:
                out = block.relu1(_conv(block.conv1, self._push(next(caches), rows, x)))
                out = block.relu2(_conv(block.conv2, self._push(next(caches), rows, out)))
                x = block.relu(out + (x if block.downsample is None else _conv(block.downsample, x)))
            windows.append(self._push(next(caches), rows, x))
        return windows

    def _push(self, index: int, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Cache `index` of `rows` followed by new columns [N, C, L]; the cache keeps the window's last columns."""
        cache = self._caches[index]
        window = torch.cat([cache.index_select(0, rows), columns], dim=2)
        cache[rows] = window[:, :, columns.shape[2] :]
        return window

    def _moments(self, stream_ids: list[str], seconds: np.ndarray, windows: list[torch.Tensor]) -> list[Moment]:
        """Run every head due at this second (x >= k and (x - k) % s == 0) on its streams' last k TCN outputs, in
        every member; the members' values side by side."""
        kernels, strides = self._kernels, self._strides
        due = (seconds[:, None] >= kernels) & ((seconds[:, None] - kernels) % strides == 0)  # [streams, heads]
        heads_due = np.flatnonzero(due.any(axis=0))
        if not len(heads_due):
            return []
        head_rows = [torch.from_numpy(np.flatnonzero(due[:, h])).to(self.device) for h in heads_due]  # once, not per member
        members = []
        for ven, window in zip(self.vens, windows):
            outs = [_conv(ven.heads[h], window[r, :, -kernels[h] :]) for h, r in zip(heads_due, head_rows)]
            members.append(ven.net(torch.cat(outs)[:, :, 0]))
        heads, streams = np.nonzero(due.T)  # the order of outs
        order = np.argsort(streams, kind="stable")  # group by stream, heads still in preset order
        values = torch.cat(members, dim=1).cpu().numpy()[order]
        streams, heads = streams[order], heads[order]
        rows = zip(streams.tolist(), (seconds[streams] - kernels[heads]).tolist(), seconds[streams].tolist())
        codes = pack_signs(values)
        return [Moment(stream_ids[i], start, end, v, c) for (i, start, end), v, c in zip(rows, values, codes)]

    def _allocate(self, stream_id: str) -> int:
        if not self._free:
            capacity, extra = len(self._seconds), max(8, len(self._seconds))
            self._caches = [torch.cat([c, c.new_zeros(extra, *c.shape[1:])]) for c in self._caches]
            self._seconds = np.concatenate([self._seconds, np.zeros(extra, dtype=np.int64)])
            self._free = list(range(capacity + extra - 1, capacity - 1, -1))
        row = self._free.pop()
        for cache in self._caches:
            cache[row] = 0
        self._seconds[row] = 0
        self._rows[stream_id] = row
        return row

    def _features(self, features: torch.Tensor | np.ndarray, count: int | None = None) -> torch.Tensor:
        features = torch.as_tensor(features).to(self.device, self.dtype)
        video_dim = self.video_dim
        if features.dim() != 2 or features.shape[1] != video_dim or count not in (None, features.shape[0]):
            rows = "W" if count is None else count
            raise ValueError(f"expected features [{rows}, {video_dim}], got {list(features.shape)}")
        return features


def _conv(conv: nn.Conv1d, window: torch.Tensor) -> torch.Tensor:
    """conv over a window without padding. For a single output column (a step, a due head) it is one matrix product
    of the k taps d apart with the flattened weight: same numbers, without torch's slow dilated-conv path, and on CPU
    3-4x faster than a conv over so few columns (`vmh bench encoder`)."""
    (kernel,), (dilation,) = conv.kernel_size, conv.dilation
    if window.shape[2] == (kernel - 1) * dilation + 1:
        return F.linear(window[:, :, ::dilation].flatten(1), conv.weight.flatten(1), conv.bias).unsqueeze(2)
    return conv(window)


def _inference_copy(source: VEN, config: CMHNConfig, dtype: torch.dtype) -> VEN:
    """A frozen eval-mode copy of the VEN without per-call overheads: weight norm folded into plain weights (else a
    step recomputes g * v / ||v|| per conv) and RReLU replaced by what it computes in eval mode, LeakyReLU at the mean
    slope. Built fresh (outside the caller's RNG stream), not deep-copied: removing a parametrization from a deep copy deletes the weight property from
    the class the copy shares with the original."""
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten; drawing them must not move a
        ven = VEN(config).to(dtype)  # seeded training run that validates through the live logic
    ven.load_state_dict(source.state_dict())
    for layer in [m for m in ven.modules() if parametrize.is_parametrized(m, "weight")]:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    for parent in list(ven.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.RReLU):
                setattr(parent, name, nn.LeakyReLU((child.lower + child.upper) / 2))
    return ven.eval().requires_grad_(False)
