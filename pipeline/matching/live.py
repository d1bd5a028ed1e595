"""Moment codes in, match events out: the query worker's logic, without Kafka.

:class:`LiveMatcher` holds the standing queries (text queries are encoded here, by the model whose code space the
moments live in), matches each batch of moments against all of them at once, merges the hits of one real moment
into one event, and keeps the recent moments for retrospective search.

Its state follows the partitions of the moments topic: one search archive per partition, replaced by ``restore``
when the partition arrives and dropped by ``forget`` when it leaves, and the merger state of the streams read from
it. A stream's state belongs to one producer session: a new session flushes the old one's open clusters, and so do
the stream's last moment and ``idle_timeout`` without moments; then the state is freed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections import Counter, defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.bus.records import BAD_QUERY, ErrorRecord, InvalidQuery, MatchEvent, MomentCode, MomentColumns, \
    StandingQuery, decode
from pipeline.matching.archive import ArchiveHit, MomentArchive
from pipeline.matching.matcher import chosen_kernel
from pipeline.matching.standing import Hit, HitMerger, StandingQueries
from pipeline.partitions import Origin, Partition, StreamPartitions

FOREIGN_CODE = "foreign_code"
TextEncoder = Callable[[list[str]], np.ndarray]  # texts -> packed codes [N, B/8]


def text_encoder(model, sentences) -> TextEncoder:
    """Texts -> packed codes through the frozen sentence encoder and the model's QEN."""
    import torch

    from pipeline.codes.packing import pack_signs

    device = next(model.parameters()).device

    def encode(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            vectors = torch.from_numpy(sentences.encode(texts)).to(device)
            return pack_signs(model.qen(vectors))

    return encode


class LiveMatcher:
    """Standing queries, hit merging and the per-partition archives of one code space (``bits``, ``model``).

    ``threshold`` is the model's calibrated one, given to queries registered without a threshold of their own;
    ``kernel`` is the standing-query matching kernel (``pipeline.matching.matcher.KERNELS``).
    ``archive_size`` and ``archive_age`` bound each partition's archive; ``longest_moment`` (seconds) bounds how
    much of a stream ``restore`` replays through the merger (all of it when None).
    """

    def __init__(
        self,
        bits: int,
        model: str,
        encode_text: TextEncoder,
        *,
        settle: int = 3,
        threshold: int | None = None,
        moments_per_second: Callable[[int], int] | None = None,
        longest_moment: int | None = None,
        archive_size: int = 1_000_000,
        archive_age: float | None = 24 * 3600.0,
        idle_timeout: float | None = None,
        kernel: str = "auto",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bits, self.model, self.encode_text, self.clock = bits, model, encode_text, clock
        self.threshold = threshold  # the model's calibrated one, for queries registered without
        self.queries = StandingQueries(bits, model, kernel)
        if kernel == "auto":  # timed now, at start-up, rather than in the first batch
            chosen_kernel(many=False), chosen_kernel(many=True)
        self.merger = HitMerger(settle=settle)
        self.moments_per_second, self.longest_moment = moments_per_second, longest_moment
        self.archive_size, self.archive_age, self.idle_timeout = archive_size, archive_age, idle_timeout
        MomentArchive(bits, archive_size, archive_age)  # checks the settings now, not at the first partition
        self._archives: dict[Partition | None, MomentArchive] = {}
        self._restored: set[Partition] = set()  # partitions whose archive holds all they should
        self._second: dict[str, list[int]] = {}  # stream -> [latest second, its moments seen so far]
        self._sessions: dict[str, str] = {}  # stream -> the session its merger state belongs to
        self._seen: dict[str, float] = {}  # stream -> clock of its last moment
        self._latest: dict[str, tuple[int, int]] = {}  # stream -> span of its latest moment, to tell end markers
        self._partitions = StreamPartitions()

    def __len__(self) -> int:
        """Streams whose state is held."""
        return len(self._sessions)

    @property
    def replay_seconds(self) -> int | None:
        """Seconds of a stream's past moments that rebuild the merger's state for it: a published hit suppresses
        later ones for up to longest / repeat_iou seconds, and clusters settle ``settle`` seconds after their hit."""
        if self.longest_moment is None:
            return None
        longest = self.longest_moment
        return int(np.ceil(longest / self.merger.repeat_iou)) + self.merger.settle + longest

    def apply_queries(self, changes: Sequence[tuple[str, StandingQuery | None]],
                      origins: Sequence[Origin] | None = None) -> list[ErrorRecord]:
        """Apply (query id, query or None for a tombstone) changes in log order; text-only queries get their code
        here, all of a batch in one encoder call. A query that cannot be used, for whatever reason, becomes an
        error record (citing ``origins[i]``, where ``changes[i]`` was read) and the others are applied."""
        texts = [q.text for _, q in changes if q is not None and q.code is None]
        codes = iter(self._encode_texts(texts))
        errors = []
        for (query_id, query), origin in zip(changes, origins if origins is not None else [None] * len(changes)):
            if query is None:
                self.queries.delete(query_id)
                continue
            try:
                code = query.code
                if code is None:
                    code = next(codes)
                    if isinstance(code, Exception):
                        raise InvalidQuery(f"query {query_id!r}: its text cannot be encoded: {code}")
                threshold = self.threshold if query.threshold is None else query.threshold
                if threshold is None:
                    raise InvalidQuery(f"query {query_id!r} has no threshold and model {self.model!r} has no "
                                       "calibrated one: give it a threshold")
                self.queries.add(replace(query, code=code, bits=self.bits if query.code is None else query.bits,
                                         threshold=threshold, model=query.model or self.model))
            except InvalidQuery as e:
                self.queries.delete(query_id)  # a query replaced by an unusable one is not kept in its old form
                errors.append(ErrorRecord(source=query_id, kind=BAD_QUERY, time=self.clock(),
                                          message=f"{origin}: {e}" if origin else str(e),
                                          context=origin.context() if origin else {}))
        return errors

    def process(self, moments: Sequence[MomentCode], origins: Sequence[Origin] | None = None,
                emit: bool = True) -> tuple[list[MatchEvent], list[ErrorRecord]]:
        """Match a batch of moments (log order; ``origins[i]`` is where ``moments[i]`` was read): the events that
        settled with it, and error records for moments of another code space. ``emit=False`` replays moments to
        rebuild the merger after a restart: no events, no archive, no errors."""
        origins = list(origins) if origins is not None else [None] * len(moments)
        settled = self._evict_idle() if emit else []
        errors = []
        usable = []
        for moment, origin in zip(moments, origins):
            if moment.bits != self.bits or (moment.model and moment.model != self.model):
                errors.append(self._foreign(moment, origin))
            else:
                usable.append((moment, origin))
        for segment in _segments(usable):
            settled += self._match(segment, emit)
        if not emit:
            return [], []
        now = self.clock()
        events = [MatchEvent(h.query_id, h.stream_id, h.start, h.end, h.distance, self.bits, h.capture_time, now)
                  for h in settled]
        return events, errors

    def restore(self, partition: Partition, chunks: Iterable[MomentColumns]) -> int:
        """A partition arrived: its archive becomes the moments of ``chunks`` (its recent moments in log order,
        decoded chunk by chunk as columns, so that a day of them never exists as objects), and its streams' merger
        state is rebuilt by replaying their last ``replay_seconds`` (media seconds of each stream: record time stalls
        when an upstream worker restarts). Returns the moments archived."""
        archive = MomentArchive(self.bits, self.archive_size, self.archive_age)
        self._archives[partition] = archive
        self._restored.discard(partition)  # not complete until the last chunk is in
        keys: dict[tuple[str, str], int] = {}  # per stream and session: a new session counts from 0 again
        newest = np.zeros(0, np.int64)  # latest end per key
        window = np.inf if self.replay_seconds is None else self.replay_seconds
        tail: list[bytes] = []  # the records that may be replayed, in log order, with their ends and keys
        tail_ends, tail_keys = np.zeros(0, np.int64), np.zeros(0, np.int64)
        archived = 0
        for chunk in chunks:
            usable = np.isin(chunk.models, [i for i, m in enumerate(chunk.model_ids) if m in ("", self.model)])
            rows = np.flatnonzero(usable)
            archive.extend(chunk.codes[rows], chunk.capture_times[rows], chunk.starts[rows], chunk.ends[rows],
                           chunk.streams[rows], chunk.stream_ids)
            archived += len(rows)
            local = chunk.streams[rows] * len(chunk.session_ids) + chunk.sessions[rows]
            present = np.unique(local)
            ids = np.array([keys.setdefault((chunk.stream_ids[i // len(chunk.session_ids)],
                                             chunk.session_ids[i % len(chunk.session_ids)]), len(keys))
                            for i in present.tolist()], np.int64)
            newest = np.concatenate([newest, np.zeros(len(keys) - len(newest), np.int64)])
            row_keys = ids[np.searchsorted(present, local)]
            np.maximum.at(newest, row_keys, chunk.ends[rows])
            tail += [chunk.values[i] for i in rows.tolist()]
            tail_ends, tail_keys = np.concatenate([tail_ends, chunk.ends[rows]]), np.concatenate([tail_keys, row_keys])
            recent = np.flatnonzero(tail_ends > newest[tail_keys] - window)
            tail, tail_ends, tail_keys = [tail[i] for i in recent.tolist()], tail_ends[recent], tail_keys[recent]
        self._restored.add(partition)
        moments = [decode(value, MomentCode) for value in tail]
        self.process(moments, [Origin(partition[0], partition[1], -1)] * len(moments), emit=False)
        return archived

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions left: their archives and their streams' merger state go with them."""
        partitions = {(topic, partition) for topic, partition in partitions}
        for partition in partitions:
            self._archives.pop(partition, None)
            self._restored.discard(partition)
        for stream_id in self._partitions.take(partitions):
            self._free(stream_id)

    def held_partitions(self) -> list[Partition]:
        """The partitions whose recent moments are all in the archives: what a search reply may claim."""
        return sorted(self._restored)

    def search(self, text: str | None = None, code: np.ndarray | None = None, since: float | None = None,
               until: float | None = None, top_k: int = 10) -> list[ArchiveHit]:
        """Top-k archived moments nearest to a text or a code, captured in [since, until]: by distance, then
        newest first; each names the partition whose archive holds it."""
        if code is None:
            if not text or not text.strip():
                raise InvalidQuery("a search needs a non-empty text or a code")
            code = self.encode_text([text])[0]
        code = np.asarray(code, dtype=np.uint8)
        hits = [hit._replace(partition=None if partition is None else partition[1])
                for partition, archive in self._archives.items() for hit in archive.search(code, since, until, top_k)]
        return sorted(hits, key=lambda h: (h.distance, -h.capture_time))[:top_k]

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray | Exception]:
        """Codes of texts, all in one call; when that fails, one by one, so only the texts at fault fail."""
        if not texts:
            return []
        try:
            return list(self.encode_text(texts))
        except Exception:
            pass
        codes: list[np.ndarray | Exception] = []
        for text in texts:
            try:
                codes.append(self.encode_text([text])[0])
            except Exception as e:  # any text the encoder cannot take is this query's error, never the worker's
                codes.append(e)
        return codes

    def _match(self, segment: list[tuple[MomentCode, Origin | None]], emit: bool) -> list[Hit]:
        """Moments in which no stream changes session: hits, settling, the stream's end. A ``last`` moment that
        repeats the stream's latest one is the encoder's end marker: it ends the stream and is not a moment."""
        settled: list[Hit] = []
        ended, kept = set(), []
        for moment, origin in segment:
            stream_id = moment.stream_id
            if self._sessions.get(stream_id, moment.session) != moment.session:
                settled += self._end(stream_id)  # a new producer session: the old one is over
            if moment.last:
                ended.add(stream_id)
                if self._latest.get(stream_id) == (moment.start, moment.end):
                    continue
            self._sessions[stream_id] = moment.session
            self._seen[stream_id] = self.clock()
            self._latest[stream_id] = (moment.start, moment.end)
            if origin is not None or stream_id not in self._partitions:
                self._partitions.note(stream_id, origin.where if origin else None)
            kept.append((moment, origin))
        segment = kept
        moments = [moment for moment, _ in segment]
        if emit:
            by_partition: dict[Partition | None, list[MomentCode]] = defaultdict(list)
            for moment, origin in segment:
                by_partition[origin.where if origin else None].append(moment)
            for partition, part in by_partition.items():
                if partition not in self._archives:
                    self._archives[partition] = MomentArchive(self.bits, self.archive_size, self.archive_age)
                self._archives[partition].add(part)
        hits: dict[tuple[str, int], list[Hit]] = defaultdict(list)
        for hit in self.queries.match(moments):
            hits[hit.stream_id, hit.end].append(hit)
        counts = Counter((m.stream_id, m.end) for m in moments)
        for (stream, end), count in sorted(counts.items()):
            # a second's clusters settle once all of its moments are placed: when its last expected moment arrives,
            # or else when a later second does; so the events do not depend on how moments were batched
            settled += self.merger.update(stream, end - 1)
            settled += self.merger.update(stream, end - 1, hits.get((stream, end), ()))
            latest = self._second.setdefault(stream, [end, 0])
            if latest[0] != end:
                latest[:] = [end, 0]
            latest[1] += count
            if self.moments_per_second is not None and latest[1] >= self.moments_per_second(end):
                settled += self.merger.update(stream, end)
        for stream_id in sorted(ended):
            settled += self._end(stream_id)
        return settled

    def _end(self, stream_id: str) -> list[Hit]:
        """The stream (session) is over: publish its open clusters now and free its state."""
        settled = self.merger.flush(stream_id)
        self._free(stream_id)
        return settled

    def _free(self, stream_id: str) -> None:
        self.merger.drop(stream_id)
        for state in (self._second, self._sessions, self._seen, self._latest):
            state.pop(stream_id, None)
        self._partitions.discard(stream_id)

    def _evict_idle(self) -> list[Hit]:
        if self.idle_timeout is None:
            return []
        cutoff = self.clock() - self.idle_timeout
        return [hit for stream_id in [s for s, seen in self._seen.items() if seen < cutoff]
                for hit in self._end(stream_id)]

    def _foreign(self, moment: MomentCode, origin: Origin | None) -> ErrorRecord:
        where = f"{origin}: " if origin else ""
        return ErrorRecord(source=moment.stream_id, kind=FOREIGN_CODE, time=self.clock(),
                           message=f"{where}moment {moment.start}-{moment.end} is a {moment.bits}-bit code of model "
                                   f"{moment.model!r}; this query worker matches {self.bits}-bit codes of model "
                                   f"{self.model!r}",
                           context=origin.context() if origin else {})


def _segments(items: list[tuple[MomentCode, Origin | None]]) -> list[list]:
    """Cut a batch where a stream changes session, so that each piece is matched as one batch."""
    segments: list[list] = [[]]
    sessions: dict[str, str] = {}  # stream -> its session in the current piece
    for item in items:
        moment = item[0]
        if sessions.setdefault(moment.stream_id, moment.session) != moment.session:
            segments.append([])
            sessions = {moment.stream_id: moment.session}
        segments[-1].append(item)
    return [segment for segment in segments if segment]
