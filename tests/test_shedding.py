"""Load shedding: the policy in front of the CNN with small frames, and the decoder's own shedding on real video.

A live stream the process cannot keep up with loses whole seconds, marked as gaps and counted; a file pushed without
--realtime loses nothing.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.features.shedding import LoadShedder
from pipeline.video.source import SampledFrame, Shedding, SourceOptions, VideoSource

PIXELS = np.zeros((2, 2, 3), np.uint8)


def frame(stream: str, media: float, capture: float, gap: float = 0.0, dropped: float = 0.0) -> SampledFrame:
    return SampledFrame(stream, int(media), media, capture, PIXELS, gap, dropped)


def test_a_late_second_is_dropped_whole_and_its_gap_goes_onto_the_next_kept_frame() -> None:
    shedder = LoadShedder(max_lag=2.0, live=["cam"])
    kept, dropped = shedder.admit([frame("cam", 0.0, 100.0), frame("cam", 0.5, 100.5)], now=101.0)
    assert [f.media_time for f in kept] == [0.0, 0.5] and dropped == {}
    # second 1's first frame is 2.5 s old: the whole second goes, even its second frame, which is younger
    kept, dropped = shedder.admit([frame("cam", 1.0, 101.0), frame("cam", 1.5, 101.6)], now=103.5)
    assert kept == [] and dropped == {"cam": 1.0}
    kept, dropped = shedder.admit([frame("cam", 2.0, 103.0, gap=0.25), frame("cam", 2.5, 103.5)], now=104.0)
    assert [(f.media_time, f.gap) for f in kept] == [(2.0, 1.25), (2.5, 0.0)] and dropped == {}


def test_files_that_are_not_live_are_never_dropped() -> None:
    shedder = LoadShedder(max_lag=2.0, live=["cam"])
    kept, dropped = shedder.admit([frame("file", 0.0, 0.0), frame("cam", 0.0, 0.0)], now=1000.0)
    assert [f.stream_id for f in kept] == ["file"] and dropped == {"cam": 1.0}


def test_the_decoders_drops_are_counted_and_a_dropped_frames_gap_carries_on() -> None:
    shedder = LoadShedder(max_lag=2.0, live=["cam"])
    kept, dropped = shedder.admit([frame("cam", 7.0, 0.0, gap=3.0, dropped=3.0)], now=10.0)  # late as well
    assert kept == [] and dropped == {"cam": 4.0}
    kept, _ = shedder.admit([frame("cam", 8.0, 10.0)], now=10.1)
    assert kept[0].gap == 4.0
    shedder.forget("cam")
    kept, _ = shedder.admit([frame("cam", 0.0, 20.0)], now=20.0)  # a new stream of the same name starts clean
    assert kept[0].gap == 0.0


def test_max_lag_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_lag"):
        LoadShedder(0, [])


def gop_clip(path: Path, seconds: int, fps: int = 25) -> Path:
    """An H.264 file with a keyframe every second, its frames a moving gradient."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(fps)})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(seconds * fps):
            image = np.roll(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3)), i, axis=1)
            video = av.VideoFrame.from_ndarray(image, format="rgb24")
            video.pts = i
            out.mux(stream.encode(video))
        out.mux(stream.encode())
    return path


def test_a_paced_source_behind_its_schedule_drops_up_to_a_keyframe_and_marks_the_gap(tmp_path: Path) -> None:
    """Real decoding: the consumer stalls for 1.5 s, the source sheds the video it could not take in time."""
    path = gop_clip(tmp_path / "gop.mp4", 4)
    source = VideoSource(str(path), options=SourceOptions(sample_rate=4, frame_size=16, realtime=True, max_lag=0.5))
    frames, started = [], time.monotonic()
    markers = []
    for sampled in source:
        if isinstance(sampled, Shedding):
            markers.append((sampled, len(frames)))
            continue
        frames.append((sampled, time.time()))
        if len(frames) == 2:
            time.sleep(1.5)  # a stalled CNN
    # the drop was announced before the hole, naming the second of the last frame before it
    assert [(m.stream_id, m.second, frames[i - 1][0].second) for m, i in markers] == [(source.stream_id, 0, 0)]
    elapsed = time.monotonic() - started
    media = [f.media_time for f, _ in frames]
    assert media == sorted(media) and elapsed < 4.5  # it kept to the clock instead of falling behind
    holes = [f for f, _ in frames if f.dropped]
    assert len(holes) == 1 and holes[0].gap == holes[0].dropped and 0.5 <= holes[0].dropped <= 2.0
    assert holes[0].media_time == pytest.approx(round(holes[0].media_time))  # resumed at a keyframe: whole seconds
    after = [(f, released) for f, released in frames if f.media_time >= holes[0].media_time]
    assert all(released - f.capture_time < 0.5 for f, released in after)  # on schedule again
    assert len(frames) < 16  # 4 s at 4 a second, less what was dropped


def test_a_file_not_paced_is_never_dropped(tmp_path: Path) -> None:
    path = gop_clip(tmp_path / "gop.mp4", 2)
    frames = []
    for sampled in VideoSource(str(path), options=SourceOptions(sample_rate=4, frame_size=16, max_lag=0.1)):
        frames.append(sampled)
        time.sleep(0.05)
    assert len(frames) == 8 and not any(f.gap or f.dropped for f in frames)
