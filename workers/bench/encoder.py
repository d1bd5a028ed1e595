"""`encoder`: the incremental causal encoder (StreamingEncoder.step) against re-running the causal VEN over the
last window every second, for many streams batched.

Both start from the same history: every stream has ``window`` seconds behind it (the streaming encoder is rebuilt
from them, the reference reads them). Each call is one new second for every stream; ours steps once, the reference
runs the whole VEN over the stream's last ``window`` seconds and keeps the moments that end at the new second. The
window starts on a multiple of every head's stride (so it is ``window`` or a few seconds longer), else the strided
heads' moments would not line up with the stream's. With ``window`` at least the receptive field (82 s for tacos)
the moments are the full-history ones, so both must give the same codes; bits that differ are counted, and only
flips of values within rounding of zero are allowed.

Weights are freshly initialised and features random (L2-normalised like pooled CNN features): speed and equality
do not depend on training.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

from workers.bench.runner import Case, Verdict

NAME = "encoder"
TITLE = "incremental causal encoder (StreamingEncoder.step) against re-running the causal VEN over the window"
REFERENCE = "causal VEN forward over each stream's last window (all streams batched), every second"
UNIT = "stream-seconds/s"  # one second of video of one stream
TARGET = 20.0
REPEATS = 3
WARMUP = 1
ROUNDING = 1e-4  # a value this close to zero (relative to the largest) may take either sign


@dataclass(frozen=True)
class Params:
    preset: str = field(default="tacos", metadata={"help": "CMHN preset"})
    streams: int = field(default=64, metadata={"help": "streams advanced together"})
    window: int = field(default=256, metadata={"help": "seconds the reference re-runs the model over"})
    video_dim: int = field(default=1280, metadata={"help": "feature width V (MobileNetV2: 1280)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and features"})


class _Feed:
    """Per-second features [streams, V] of every stream, kept for the reference's windows. They are made ``CHUNK``
    seconds ahead, so making them is not timed in the first calls (the first ``CHUNK`` timed seconds)."""

    CHUNK = 64

    def __init__(self, streams: int, dim: int, seed: int) -> None:
        import torch

        self.streams, self.dim = streams, dim
        self.generator = torch.Generator().manual_seed(seed)
        self.seconds = torch.empty(streams, 0, dim)

    def upto(self, end: int):
        """Features of seconds [0, end): [streams, end, V]."""
        import torch

        if end > self.seconds.shape[1]:
            more = torch.randn(self.streams, end + self.CHUNK - self.seconds.shape[1], self.dim,
                               generator=self.generator)
            self.seconds = torch.cat([self.seconds, more / more.norm(dim=2, keepdim=True)], dim=1)
        return self.seconds[:, :end]


def _stream_id(index: int) -> str:
    return f"stream-{index}"


def cases(params: Params, stack: ExitStack) -> list[Case]:
    import numpy as np
    import torch

    from pipeline.model import StreamingEncoder, build_cmhn, candidate_spans

    torch.manual_seed(params.seed)
    model = build_cmhn(params.preset, video_dim=params.video_dim).eval()
    config = model.config
    encoder = StreamingEncoder(model)
    if params.window < encoder.receptive_field:
        raise ValueError(f"a window of {params.window} s is shorter than the receptive field "
                         f"({encoder.receptive_field} s): the reference's moments would not be the full-history ones")
    feed = _Feed(params.streams, params.video_dim, params.seed)
    ids = [_stream_id(i) for i in range(params.streams)]
    for i, stream in enumerate(ids):
        encoder.rebuild(stream, feed.upto(params.window)[i], params.window)
    align = math.lcm(*config.strides)
    clock = {"ours": params.window, "reference": params.window}  # the second each side consumes next

    def ours():
        second = clock["ours"]
        clock["ours"] += 1
        return encoder.step(ids, feed.upto(second + 1)[:, second])

    @torch.inference_mode()
    def reference():
        end = clock["reference"] + 1
        clock["reference"] += 1
        start = (end - params.window) // align * align
        values = model.ven(feed.upto(end)[:, start:])  # [streams, N, B]
        spans = candidate_spans(end - start, config.kernel_sizes, config.strides) + start
        final = np.flatnonzero(spans[:, 1] == end)
        return values[:, final].numpy(), spans[final]

    return [Case(
        label=f"{params.preset} V={params.video_dim} {params.streams} streams",
        ours=ours,
        reference=reference,
        work=params.streams,
        check=check,
        amounts=lambda out: {"moments": len(out)},
        notes={"receptive_field_s": encoder.receptive_field, "window_aligned_to_s": align,
               "weights": "random init", "features": "random, L2-normalised"},
    )]


def check(moments: list, reference: tuple) -> Verdict:
    """The same moments with the same codes; a differing bit is allowed only where the value rounds to zero."""
    import numpy as np

    from pipeline.codes.packing import pack_signs

    values, spans = reference  # [streams, moments, B], [moments, 2]
    theirs = {(_stream_id(s), int(a), int(b)): values[s, m] for s in range(len(values))
              for m, (a, b) in enumerate(spans)}
    mine = {(m.stream_id, m.start, m.end): m for m in moments}
    if mine.keys() != theirs.keys():
        missing, extra = sorted(theirs.keys() - mine.keys()), sorted(mine.keys() - theirs.keys())
        return Verdict([f"moments (stream, start, end) missing {missing[:5]}, extra {extra[:5]}"])
    keys = sorted(mine)
    ref = np.stack([theirs[k] for k in keys])
    values = np.stack([mine[k].values for k in keys])
    codes, ref_codes = np.stack([mine[k].code for k in keys]), pack_signs(ref)
    flips = np.unpackbits(codes ^ ref_codes, axis=1).astype(bool)
    near_zero = np.abs(ref) <= ROUNDING * np.abs(ref).max()
    unexplained = int((flips & ~near_zero).sum())
    error = float(np.abs(values - ref).max() / np.abs(ref).max())
    problems = []
    if unexplained:
        problems.append(f"{unexplained} code bits differ where the value is not within rounding of zero")
    if error > ROUNDING:
        problems.append(f"pre-sign values differ by {error:.2e} of the largest, allowed {ROUNDING:g}")
    return Verdict(problems, {
        "moments compared": len(keys),
        "codes differing": int(flips.any(axis=1).sum()),
        "bits differing": int(flips.sum()),
    })
