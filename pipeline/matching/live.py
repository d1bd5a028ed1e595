"""Moment codes in, match events out: the query worker's logic, without Kafka.

:class:`LiveMatcher` holds the standing queries (text queries are encoded here, by the model whose code space the
moments live in), matches each batch of moments against all of them at once, merges the hits of one real moment
into one event, and keeps the recent moments for retrospective search.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

from pipeline.bus.records import BAD_QUERY, ErrorRecord, InvalidQuery, MatchEvent, MomentCode, StandingQuery
from pipeline.matching.archive import ArchiveHit, MomentArchive
from pipeline.matching.standing import Hit, HitMerger, StandingQueries

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
    """Standing queries, hit merging and the archive of one code space (``bits``, ``model``)."""

    def __init__(
        self,
        bits: int,
        model: str,
        encode_text: TextEncoder,
        *,
        settle: int = 3,
        moments_per_second: Callable[[int], int] | None = None,
        archive_size: int = 1_000_000,
        archive_age: float | None = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bits, self.model, self.encode_text, self.clock = bits, model, encode_text, clock
        self.queries = StandingQueries(bits, model)
        self.merger = HitMerger(settle=settle)
        self.archive = MomentArchive(bits, archive_size, archive_age)
        self.moments_per_second = moments_per_second
        self._second: dict[str, list[int]] = {}  # stream -> [latest second, its moments seen so far]

    def apply_queries(self, changes: Sequence[tuple[str, StandingQuery | None]]) -> list[ErrorRecord]:
        """Apply (query id, query or None for a tombstone) changes in log order; text-only queries get their code
        here, all of a batch in one encoder call. A query that cannot be used becomes an error record."""
        texts = [q.text for _, q in changes if q is not None and q.code is None]
        codes = iter(self.encode_text(texts)) if texts else iter(())
        errors = []
        for query_id, query in changes:
            if query is None:
                self.queries.delete(query_id)
                continue
            try:
                if query.code is None:
                    query = StandingQuery(query.query_id, query.text, next(codes), self.bits, query.threshold,
                                          query.created_time, self.model)
                self.queries.add(query)
            except InvalidQuery as e:
                errors.append(ErrorRecord(source=query_id, kind=BAD_QUERY, message=str(e), time=self.clock()))
        return errors

    def process(self, moments: Sequence[MomentCode], emit: bool = True) -> tuple[list[MatchEvent], list[ErrorRecord]]:
        """Match a batch of moments (log order): the events that settled with it, and error records for moments of
        another code space. ``emit=False`` replays moments to rebuild the merger after a restart: no events, no
        archive, no errors."""
        foreign = [m for m in moments if m.bits != self.bits or (m.model and m.model != self.model)]
        if foreign:
            moments = [m for m in moments if m.bits == self.bits and not (m.model and m.model != self.model)]
        if emit:
            self.archive.add(moments)
        hits: dict[tuple[str, int], list[Hit]] = defaultdict(list)
        for hit in self.queries.match(moments):
            hits[hit.stream_id, hit.end].append(hit)
        counts = Counter((m.stream_id, m.end) for m in moments)
        settled = []
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
        if not emit:
            return [], []
        now = self.clock()
        events = [MatchEvent(h.query_id, h.stream_id, h.start, h.end, h.distance, self.bits, h.capture_time, now)
                  for h in settled]
        errors = [ErrorRecord(source=m.stream_id, kind=FOREIGN_CODE, time=now,
                              message=f"moment {m.start}-{m.end} is a {m.bits}-bit code of model {m.model!r}; this "
                                      f"query worker matches {self.bits}-bit codes of model {self.model!r}")
                  for m in foreign]
        return events, errors

    def replay_seconds(self, longest_moment: int) -> int:
        """Seconds of a stream's past moments that rebuild the merger's state for it: a published hit suppresses
        later ones for up to longest / min_iou seconds, and clusters settle ``settle`` seconds after their hit."""
        return int(np.ceil(longest_moment / self.merger.min_iou)) + self.merger.settle + longest_moment

    def search(self, text: str | None = None, code: np.ndarray | None = None, since: float | None = None,
               until: float | None = None, top_k: int = 10) -> list[ArchiveHit]:
        """Top-k archived moments nearest to a text or a code, captured in [since, until]."""
        if code is None:
            if not text or not text.strip():
                raise InvalidQuery("a search needs a non-empty text or a code")
            code = self.encode_text([text])[0]
        return self.archive.search(np.asarray(code, dtype=np.uint8), since, until, top_k)
