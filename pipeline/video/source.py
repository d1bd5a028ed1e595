"""Open a video source with PyAV and sample frames at a fixed rate of media time, ready for the frame CNN.

Sampling follows presentation timestamps, not frame indices, so variable frame rate and dropped frames do not shift
the second a frame is counted in. Only sampled frames are converted: libswscale resizes and converts them to RGB in
one pass, every other frame is decoded (the codec needs it as a reference) and dropped.

Live sources (network streams, capture devices) reconnect with exponential backoff when they end, fail or stall;
media time then resumes from the wall-clock time that passed, and the first sampled frame after the hole carries
the missing seconds in ``gap``, so the hole is visible downstream instead of silently joining two moments.

When several frames fall in one sampling slot, the decoder skips the non-reference frames (B-frames, mostly) that
cannot be the slot's sampled one: libavcodec's ``skip_frame = "NONREF"`` is set for the packets whose presentation
time comes after an earlier packet of the same slot. Reference frames are always decoded, so every frame that is
decoded, and so every sampled frame, has the pixels and timestamp of a full decode. The one assumption is that a
non-reference frame arrives after every earlier-presented frame (true of every H.264/HEVC encoder's ordering); were it
broken, a slot would take its next decoded frame instead. An H.264 packet tells a non-reference picture by its NAL
headers (``nal_ref_idc`` 0), so one that the decoder would skip and that holds such a picture and nothing else is not
sent at all: libavcodec would hand it to a frame thread only to parse and drop it, and that thread's turn is lost to
the frames that are decoded (on two free cores, kept from the decoder, they made skipping 1.4 times as fast again).

A live source (or a file paced as one) that the process cannot keep up with sheds load instead of queueing: once a
decoded frame is more than ``max_lag`` seconds behind the source's own schedule, the decoder drops every packet up
to the next keyframe (inter frames cannot be decoded without their references), and the first frame after the hole
carries the dropped media seconds in ``gap`` and ``dropped``. Files that are not paced are never dropped. When the
drop begins the source yields a ``Shedding`` marker: the second in progress gets no more frames, and what was
sampled of it can go downstream at once rather than wait out the hole (up to a keyframe, which may be many seconds).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.redact import redact

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt")
_EPS = 1e-6  # timestamps are rationals turned into floats: 0.25 may arrive as 0.2499999
_DRIFT = 1e-3  # seconds a second a live source's clock may run slow against ours without counting as lag


class SourceError(Exception):
    """A video source that cannot be read. The message names the source without its credentials (it becomes an
    error record and a log line), however it was put together from the URL and PyAV's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class SourceUnavailable(SourceError):
    """The source does not exist, refuses or times out, or stayed down through every reconnect attempt."""


class CorruptSource(SourceError):
    """The source answers but its bytes are not decodable video."""


@dataclass(frozen=True)
class SampledFrame:
    """One sampled frame. ``media_time`` counts seconds from the start of the stream and only ever increases
    (across loops and reconnects); ``gap`` is the media seconds missing just before this frame, 0 when none."""

    stream_id: str
    second: int
    media_time: float
    capture_time: float  # wall clock (time.time()) when the frame arrived, or was due when paced, before any backlog
    rgb: np.ndarray  # uint8 [frame_size, frame_size, 3]
    gap: float = 0.0
    dropped: float = 0.0  # the part of ``gap`` shed to keep up with a live source (the rest: reconnects)


@dataclass(frozen=True)
class Shedding:
    """The source began dropping media up to a keyframe to keep up: ``second`` (of its last sampled frame) will
    get no more frames."""

    stream_id: str
    second: int


@dataclass(frozen=True)
class SourceOptions:
    sample_rate: float = 4.0  # frames per second of media time
    frame_size: int = 224  # frames are scaled (not cropped: live events happen at the edges too) to a square
    realtime: bool = False  # pace a file as if it were live
    loop: bool = False  # repeat a file forever
    live: bool | None = None  # reconnect when the source ends or fails; None infers it from the URL
    open_timeout: float = 10.0  # seconds to connect and read the stream headers
    stall_timeout: float = 10.0  # seconds without data or without a decoded frame before a live source reconnects
    reconnect_attempts: int = 10  # consecutive failed reconnects before giving up
    backoff: float = 0.5  # first wait between reconnects, doubled each failure
    backoff_max: float = 30.0
    max_lag: float = 2.0  # seconds a live frame may fall behind its schedule before the decoder sheds up to a keyframe

    def __post_init__(self) -> None:
        if not self.sample_rate > 0:
            raise ValueError(f"sample_rate must be > 0, got {self.sample_rate}")
        if self.frame_size < 16:
            raise ValueError(f"frame_size must be >= 16 pixels, got {self.frame_size}")
        if self.open_timeout <= 0 or self.stall_timeout <= 0 or self.max_lag <= 0:
            raise ValueError("open_timeout, stall_timeout and max_lag must be > 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace, realtime: bool = False, loop: bool = False) -> SourceOptions:
        """From the settings sample-rate, frame-size, open-timeout, stall-timeout and max-lag."""
        return cls(
            args.sample_rate,
            args.frame_size,
            realtime,
            loop,
            open_timeout=args.open_timeout,
            stall_timeout=args.stall_timeout,
            max_lag=args.max_lag,
        )


@dataclass(frozen=True)
class _Target:
    """What av.open needs for one source."""

    file: str
    format: str | None
    options: dict[str, str]
    network: bool
    live: bool


def resolve_target(url: str) -> _Target:
    """Map a user-facing source name (path, URL, ``/dev/videoN``, ``device:N``) to av.open arguments."""
    if url.startswith("device:"):
        name = url.removeprefix("device:")
        if sys.platform == "darwin":
            return _Target(name, "avfoundation", {}, False, True)
        if sys.platform == "win32":
            return _Target(f"video={name}", "dshow", {}, False, True)
        return _Target(name if name.startswith("/") else f"/dev/video{name}", "v4l2", {}, False, True)
    if url.startswith("/dev/video"):
        return _Target(url, "v4l2", {}, False, True)
    scheme = urlsplit(url).scheme.lower()
    if scheme in NETWORK_SCHEMES:
        options = {"rtsp_transport": "tcp"} if scheme.startswith("rtsp") else {}
        live = scheme in LIVE_SCHEMES or urlsplit(url).path.endswith(".m3u8")
        return _Target(url, None, options, True, live)
    path = url.removeprefix("file://") if scheme == "file" else url
    return _Target(path, None, {}, False, False)


class _Reconnect(Exception):
    """A live session ended badly (stall, read error); the caller reconnects."""


class _Timeline:
    """Turns per-session presentation times into one increasing media time, and decides which frames to sample."""

    def __init__(self, sample_rate: float) -> None:
        self.rate = sample_rate
        self.last_slot = -1
        self.last_media: float | None = None  # media time of the last decoded frame
        self.last_wall = 0.0  # monotonic clock at the last decoded frame
        self.interval = 1.0 / 25  # duration of the last frame, refined from timestamps
        self.offset = 0.0  # media time = presentation time + offset
        self.anchor: str | None = "start"  # how to place the next session: start, loop, resume
        self.pending_gap = 0.0
        self.pending_dropped = 0.0
        self._first: dict[int, float] = {}  # slot -> earliest presentation time demuxed in it, recent slots only
        self.origin: float | None = None  # monotonic time at which media time 0 was due
        self._lag_at = 0.0

    def place(self, t: float, now: float) -> float:
        """Media time of a frame presented at ``t`` (session clock), decoded at monotonic time ``now``."""
        if self.anchor is not None:
            self._anchor(t, now)
        elif self.last_media is not None and t + self.offset > self.last_media:
            self.interval = t + self.offset - self.last_media
        media = t + self.offset
        self.last_media, self.last_wall = media, now
        return media

    def rebase_if_discontinuous(self, t: float, now: float, live: bool, max_jump: float) -> None:
        """Timestamps that jump back (a wrap, an encoder restart, segments joined into one file) are re-anchored: a
        live stream's to the wall clock, a file's to just after its last frame; otherwise every frame until the
        clock caught up again would be dropped as already sampled. A live stream's jump forward beyond ``max_jump``
        is re-anchored too; a file's is a real gap in its media (a still screen in a recording)."""
        if self.last_media is None:
            return
        step = t + self.offset - self.last_media
        if step < 0 or (live and step > max_jump):
            self.anchor = "resume" if live else "loop"

    def _anchor(self, t: float, now: float) -> None:
        if self.anchor == "start":
            start = 0.0
        elif self.anchor == "loop":
            start = self.last_media + self.interval
        else:  # resume after a hole: the wall-clock time that passed is media time that was missed
            start = self.last_media + max(now - self.last_wall, self.interval)
            self.pending_gap += start - self.last_media - self.interval
        self.offset = start - t
        self.anchor = None
        self._first.clear()

    def needed(self, t: float) -> bool:
        """Whether the packet presented at ``t`` (session clock) may hold its slot's sampled frame: not when an
        earlier-presented packet of the slot was demuxed before it, nor when the slot is sampled already."""
        if self.anchor is not None:
            return True  # the session's clock is not placed yet
        slot = math.floor((t + self.offset) * self.rate + _EPS)
        first = self._first.get(slot)
        if first is None:
            self._first[slot] = t
            if len(self._first) > 16:  # reordering spans a few frames; forget old slots
                for old in [s for s in self._first if s < slot - 8]:
                    del self._first[old]
            return slot > self.last_slot
        self._first[slot] = min(first, t)
        return t <= first and slot > self.last_slot

    def lag(self, media: float, now: float, paced: bool) -> float:
        """Seconds the frame at ``media``, decoded at ``now``, is behind the source's schedule. A paced file's schedule
        is fixed by its first frame; a live source's is its earliest arrival seen, let drift by 1 ms a second so that
        a camera clock slower than ours is not taken for a growing backlog."""
        due = now - media
        if self.origin is None:
            self.origin = due
        elif not paced:
            self.origin = min(due, self.origin + _DRIFT * (now - self._lag_at))
        self._lag_at = now
        return due - self.origin

    def take(self, media: float) -> bool:
        """Sample the first frame at or after each 1/rate boundary of media time."""
        slot = math.floor(media * self.rate + _EPS)
        if slot <= self.last_slot:
            return False
        self.last_slot = slot
        return True


_DISPOSABLE_NALS = (1, 9, 12)  # a non-IDR slice, an access unit delimiter, filler: nothing that outlives the picture


def nal_length_size(codec: Any) -> int | None:
    """How the H.264 packets of ``codec`` delimit NAL units, read as libavcodec's H.264 decoder reads it: by a length
    prefix of this many bytes (avcC extradata, as in MP4 and Matroska), by start codes (0: Annex B, as in MPEG-TS and
    RTSP); None for other codecs, whose packets are not inspected."""
    if codec.name != "h264":
        return None
    extradata = codec.extradata or b""
    return (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else 0


def h264_disposable(data: bytes, length_size: int) -> bool:
    """Whether an H.264 packet holds a non-reference picture and nothing else, so that no later frame depends on it:
    every NAL unit has ``nal_ref_idc`` 0 and is a slice, a delimiter or filler (parameter sets and SEI, which may
    persist, are not dropped). Data that does not parse is not disposable: the decoder decides about it."""
    headers = []
    if length_size:
        i = 0
        while i + length_size < len(data):
            headers.append(data[i + length_size])
            i += length_size + int.from_bytes(data[i : i + length_size], "big")
        if i != len(data):
            return False
    else:
        i = data.find(b"\x00\x00\x01")
        while 0 <= i < len(data) - 3:
            headers.append(data[i + 3])
            i = data.find(b"\x00\x00\x01", i + 3)
    return 1 in [h & 0x1F for h in headers] and all(h & 0xE0 == 0 and h & 0x1F in _DISPOSABLE_NALS for h in headers)


Opener = Callable[..., Any]


class VideoSource:
    """One video stream, iterated as sampled frames. Raises ``SourceError`` subclasses, never hangs.

    A live source that cannot be opened at all fails at once (a wrong URL should not look like a flaky camera);
    once it has delivered frames it reconnects, and ``reconnects`` counts the attempts. ``opener`` is av.open;
    tests replace it to simulate sources that fail.
    """

    def __init__(
        self,
        url: str,
        stream_id: str | None = None,
        options: SourceOptions | None = None,
        opener: Opener = av.open,
    ) -> None:
        self.url = url
        self.stream_id = stream_id or redact(url)
        self.options = options or SourceOptions()
        self.target = resolve_target(url)
        self.live = self.target.live if self.options.live is None else self.options.live
        self.reconnects = 0
        self._opener = opener
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make a running iteration end at its next packet (safe from another thread)."""
        self._stop.set()

    def __iter__(self) -> Iterator[SampledFrame | Shedding]:
        timeline = _Timeline(self.options.sample_rate)
        failures = 0
        while not self._stop.is_set():
            try:
                container = self._open()
            except SourceError as e:
                if not self.live or timeline.last_media is None:
                    raise
                error: Exception = e
            else:
                produced = False
                error = _Reconnect("stream ended")
                try:
                    with container:
                        for frame in self._session(container, timeline):
                            if isinstance(frame, Shedding):
                                yield frame
                                continue
                            if self.options.realtime and not self.live:
                                due = timeline.origin + frame.media_time
                                self._stop.wait(max(0.0, due - time.monotonic()))
                                frame = replace(frame, capture_time=time.time() - max(0.0, time.monotonic() - due))
                            produced = True
                            yield frame
                except _Reconnect as e:
                    error = e
                if self._stop.is_set():
                    return
                if not self.live:
                    if timeline.last_media is None:
                        raise CorruptSource(f"{self.url}: no decodable video frames")
                    if not (self.options.loop and produced):
                        return
                    timeline.anchor = "loop"
                    continue
                timeline.anchor = "resume"
                if produced:
                    failures = 0
                    self.reconnects += 1
                    log.warning("stream %s: %s; reconnecting", self.stream_id, error)
                    continue
            failures += 1
            if failures > self.options.reconnect_attempts:
                raise SourceUnavailable(f"{self.url}: still down after {failures - 1} reconnect attempts: {error}")
            delay = min(self.options.backoff * 2 ** (failures - 1), self.options.backoff_max)
            log.warning("stream %s: reconnect %d failed (%s); retry in %.1fs", self.stream_id, failures, error, delay)
            self.reconnects += 1
            self._stop.wait(delay)

    def _open(self) -> Any:
        target, opts = self.target, self.options
        if not target.network and target.format is None and not Path(target.file).is_file():
            raise SourceUnavailable(f"{self.url}: no such file")
        started = time.monotonic()
        try:
            container = self._opener(
                target.file,
                format=target.format,
                container_options=target.options,
                timeout=(opts.open_timeout, opts.stall_timeout),
            )
        except av.error.ExitError as e:
            raise SourceUnavailable(f"{self.url}: timed out after {opts.open_timeout:g}s opening the source") from e
        except av.error.InvalidDataError as e:
            if target.network and time.monotonic() - started >= opts.open_timeout:
                raise SourceUnavailable(f"{self.url}: timed out after {opts.open_timeout:g}s opening the source") from e
            raise CorruptSource(f"{self.url}: not a readable video ({e})") from e
        except (OSError, av.error.FFmpegError) as e:
            raise SourceUnavailable(f"{self.url}: cannot open ({e})") from e
        if not container.streams.video:
            container.close()
            raise CorruptSource(f"{self.url}: has no video stream")
        return container

    def _session(self, container: Any, timeline: _Timeline) -> Iterator[SampledFrame | Shedding]:
        """Sampled frames of one opened container; errors of a live source become ``_Reconnect``."""
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        codec, time_base, skipping = stream.codec_context, float(stream.time_base or 0), False
        length_size = nal_length_size(codec)
        paced = self.options.realtime and not self.live
        sheddable = self.live or paced
        shed_from: float | None = None  # media time where the decoder began dropping up to a keyframe
        last_second: int | None = None  # of the last frame sampled in this session
        skip_packets = False  # from the drop to the next keyframe packet
        size = self.options.frame_size
        scaler = VideoReformatter()  # one per session keeps libswscale's context cached between frames
        stall = self.options.stall_timeout
        last_frame_at = time.monotonic()
        try:
            for packet in container.demux(stream):
                if self._stop.is_set():
                    return
                if self.live and time.monotonic() - last_frame_at > stall:
                    raise _Reconnect(f"no frame for {stall:g}s")
                if skip_packets and not packet.is_keyframe:
                    last_frame_at = time.monotonic()  # data is coming; it is dropped, not stalled
                    continue
                skip_packets = False
                if packet.pts is not None and time_base and skipping == timeline.needed(packet.pts * time_base):
                    skipping = not skipping
                    codec.skip_frame = "NONREF" if skipping else "DEFAULT"
                if skipping and length_size is not None and h264_disposable(bytes(packet), length_size):
                    continue  # the decoder would skip it
                for frame in packet.decode():
                    now = time.monotonic()
                    last_frame_at = now
                    t = frame.time
                    if t is None:  # no timestamp: assume the nominal spacing
                        t = (timeline.last_media or 0.0) - timeline.offset + timeline.interval
                    timeline.rebase_if_discontinuous(t, now, self.live, stall)
                    media = timeline.place(t, now)
                    lag = timeline.lag(media, now, paced)
                    if shed_from is not None and not frame.key_frame:
                        continue  # in flight in the decoder's threads when the drop began
                    if sheddable and lag > self.options.max_lag:
                        if shed_from is None:
                            log.info("stream %s: %.1fs behind; dropping up to the next keyframe", self.stream_id, lag)
                            shed_from = media
                            if last_second is not None:
                                yield Shedding(self.stream_id, last_second)
                        skip_packets = True
                        continue
                    if shed_from is not None:
                        dropped, shed_from = media - shed_from, None
                        timeline.pending_gap += dropped
                        timeline.pending_dropped += dropped
                    if not timeline.take(media):
                        continue
                    # area averaging does not alias when shrinking HD to 224; one thread: the decoder has the rest
                    rgb = scaler.reformat(frame, size, size, "rgb24", interpolation="AREA", threads=1).to_ndarray()
                    gap, timeline.pending_gap = timeline.pending_gap, 0.0
                    dropped, timeline.pending_dropped = timeline.pending_dropped, 0.0
                    last_second = math.floor(media + _EPS)
                    yield SampledFrame(self.stream_id, last_second, media, time.time() - max(0.0, lag), rgb, gap, dropped)
                    last_frame_at = time.monotonic()  # time spent downstream is not a stall
        except av.error.FFmpegError as e:
            if self.live:
                raise _Reconnect(f"read failed ({e})") from e
            if self.target.network:
                raise SourceUnavailable(f"{self.url}: read failed ({e})") from e
            raise CorruptSource(f"{self.url}: decoding failed ({e})") from e

