"""Where records come from, for the per-partition state of the live objects (``LiveCoder``, ``LiveMatcher``).

A stream's records stay on one partition of their topic, so a worker that loses a partition loses exactly the
streams on it. ``Origin`` is a record's place on the log (what error records cite); ``StreamPartitions`` remembers
which partition each stream came from, so the state of a partition's streams can be forgotten when it moves.
Partitions are ``(topic, partition)`` pairs; kafka-python's ``TopicPartition`` is one and compares equal to it.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

Partition = tuple[str, int]


class Origin(NamedTuple):
    """A record's topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    @property
    def where(self) -> Partition:
        return (self.topic, self.partition)

    def context(self) -> dict[str, str | int]:
        """The ``context`` of an error record about this record."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class StreamPartitions:
    """Which partition each stream's records come from (``None`` for records read without one, e.g. in tests)."""

    def __init__(self) -> None:
        self._partition: dict[str, Partition | None] = {}

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._partition

    def note(self, stream_id: str, partition: Partition | None) -> None:
        self._partition[stream_id] = None if partition is None else (partition[0], partition[1])

    def discard(self, stream_id: str) -> None:
        self._partition.pop(stream_id, None)

    def take(self, partitions: Iterable[Partition]) -> list[str]:
        """Forget and return the streams of ``partitions``."""
        wanted = {(topic, partition) for topic, partition in partitions}
        gone = [stream_id for stream_id, where in self._partition.items() if where in wanted]
        for stream_id in gone:
            del self._partition[stream_id]
        return gone
