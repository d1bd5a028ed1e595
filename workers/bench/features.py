"""`features`: the producer's frame CNN (FrameEncoder.encode) against a bare torch forward of the same backbone.

Both take the same uint8 RGB frames (sampled from Big Buck Bunny at each size) in batches of the same size and
return one 1280-d MobileNetV2 vector per frame, with the offline ImageNet weights. The reference is the forward a
torchvision user writes: ``x = frames.permute(0, 3, 1, 2).float() / 255``, normalise, ``model.features(x)``,
global average pool.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice

from workers.bench.decode import bigbuckbunny
from workers.bench.runner import Case, Verdict

NAME = "features"
TITLE = "producer frame CNN (FrameEncoder.encode, MobileNetV2) against a bare torch forward"
REFERENCE = ("bare torch: torchvision mobilenet_v2 with the same weights, .features then adaptive_avg_pool2d, "
             "same batches, inference_mode")
UNIT = "frames/s"
TARGET = 0.9
REPEATS = 5
WARMUP = 1
TOLERANCE = 1e-3  # largest difference allowed, relative to the largest feature value


@dataclass(frozen=True)
class Params:
    sizes: str = field(default="112,160,224", metadata={"help": "frame sizes in pixels, comma-separated"})
    frames: int = field(default=64, metadata={"help": "frames per timed call"})
    batch_size: int = field(default=64, metadata={"help": "frames per CNN forward, both sides"})


def frames_at(size: int, count: int):
    """``count`` real frames [count, size, size, 3] uint8 of the sample video, looped as needed."""
    import numpy as np

    from pipeline.video.source import SourceOptions, VideoSource

    source = VideoSource(bigbuckbunny(), options=SourceOptions(frame_size=size, loop=True, live=False))
    return np.stack([f.rgb for f in islice(iter(source), count)])


def bare_backbone(weights: str):
    """torchvision's MobileNetV2 as a user loads it, and its frames -> features function."""
    import torch
    import torch.nn.functional as F
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.inference_mode()
    def forward(frames):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        x = model.features((x - mean) / std)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()

    return forward


def check(mine, theirs) -> Verdict:
    import numpy as np

    if mine.shape != theirs.shape:
        return Verdict([f"features {mine.shape}, the reference's {theirs.shape}"])
    error = float(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-12))
    if error > TOLERANCE:
        return Verdict([f"largest difference {error:.2e} of the largest value, allowed {TOLERANCE:g}"])
    return Verdict([], {"frames compared": len(mine)})


def cases(params: Params, stack: ExitStack) -> list[Case]:
    import numpy as np

    from pipeline.features.backbone import FrameEncoder

    sizes = [int(s) for s in params.sizes.split(",")]
    batch = params.batch_size
    out = []
    for size in sizes:
        frames = frames_at(size, params.frames)
        encoder = FrameEncoder(device="cpu", frame_size=size, batch_size=batch)
        forward = bare_backbone(encoder.weights_path)
        out.append(Case(
            label=f"{size}px",
            ours=lambda encoder=encoder, frames=frames: encoder.encode(frames),
            reference=lambda forward=forward, frames=frames: np.concatenate(
                [forward(frames[i:i + batch]) for i in range(0, len(frames), batch)]),
            work=len(frames),
            check=check,
            notes={"batch_size": batch},
        ))
    return out
