"""Several video sources in one process: one decode thread per stream, merged into one bounded queue.

Decode threads of live streams run at a lower priority than the thread that takes their frames: when the process
cannot keep up, the decoders fall behind and shed whole stretches up to a keyframe (see ``pipeline.video.source``),
which costs nothing, rather than starving the CNN of the CPU and delaying every frame already decoded. They run at
the lowest priority: Linux shares the CPU among threads by weight, and at nice 10 (a weight of 110 against the CNN
thread's 1,024) the decode and codec threads of 32 overloaded streams still outweighed the CNN thread, which got
0.37 cores while 65 % of the decoded seconds were shed before it; at nice 19 it got 0.58.

A stream that fails becomes a ``StreamError`` item for that stream while the others carry on; the bounded queue
gives backpressure, so decode threads wait for the CNN instead of buffering without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

from pipeline.threads import lower_priority, name_os_thread
from pipeline.video.source import SampledFrame, Shedding, VideoSource

log = logging.getLogger(__name__)
DECODE_NICENESS = 19  # the lowest: however many decode threads there are, they yield to the CNN thread


@dataclass(frozen=True)
class StreamError:
    """The stream stopped for good because of ``error`` (a ``SourceError`` for bad sources)."""

    stream_id: str
    error: Exception


@dataclass(frozen=True)
class StreamEnded:
    """The stream reached its end normally (a file without --loop)."""

    stream_id: str


Item = Union[SampledFrame, Shedding, StreamError, StreamEnded]


class MultiSource:
    """Iterate sampled frames of many sources as they are decoded; use as a context manager so threads stop."""

    def __init__(self, sources: Iterable[VideoSource], queue_size: int = 256) -> None:
        self.sources = list(sources)
        ids = [s.stream_id for s in self.sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stream ids must be unique, got {ids}")
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(s,), name=f"decode-{s.stream_id}", daemon=True)
            for s in self.sources
        ]
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    def _put(self, item: Item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: VideoSource) -> None:
        name_os_thread(f"decode-{source.stream_id}")  # before the codec starts its own threads, which inherit it
        if source.live or source.options.realtime:  # overloaded, the CNN thread keeps up and the decoders shed
            lower_priority(DECODE_NICENESS)  # (libavcodec's threads inherit the priority too)
        try:
            for frame in source:
                if not self._put(frame):
                    return
        except Exception as e:  # one stream's failure, whatever it is, must not stop the others
            log.error("stream %s failed: %s", source.stream_id, e)
            self._put(StreamError(source.stream_id, e))
            return
        self._put(StreamEnded(source.stream_id))

    def batches(self, max_items: int = 32, stop: threading.Event | None = None) -> Iterator[list[Item]]:
        """Lists of up to ``max_items`` items: blocks for the first, then takes what is already queued, so a batch
        never waits for frames that have not been decoded yet. Ends within 0.2 s of ``stop``, even while every
        stream waits to reconnect."""
        while self._running and not self._closed.is_set() and not (stop is not None and stop.is_set()):
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < max_items:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._running -= sum(isinstance(item, (StreamError, StreamEnded)) for item in batch)
            yield batch

    def __iter__(self) -> Iterator[Item]:
        for batch in self.batches(1):
            yield from batch

    def close(self) -> None:
        """Stop every decode thread and wait for them."""
        self._closed.set()
        for source in self.sources:
            source.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> MultiSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
