"""`vmh query-worker`: moment codes in, match events out, exactly once; and retrospective search.

A thin loop around :class:`pipeline.matching.live.LiveMatcher`. Between batches it applies changes from the
log-compacted queries topic (read whole by every query worker, no consumer group) and answers search requests.
Moments are consumed in a consumer group and their match events committed in one Kafka transaction with the batch's
offsets. When partitions arrive (start, restart, rebalance) the worker re-reads their recent moments: into the
archive for search, and through the matcher without emitting, so the hit merger is where the previous owner left it.

Search goes over a reply topic rather than HTTP: each query worker holds only the moments of its own partitions,
so a request is broadcast on ``<prefix>.search-requests`` and every worker answers on ``<prefix>.search-replies``
with its top-k and the partitions it covers; the client merges replies until every partition is covered. No
service discovery, and it scales out with the consumer group.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time

from pipeline.settings import add_settings

from workers.common import StreamPartitions, use_threads

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "checkpoint", "device", "torch-threads", "bootstrap-servers", "topic-prefix", "metrics-port")
    parser.add_argument("--group", default=None,
                        help="consumer group of the query workers [default: <topic-prefix>-query]")
    parser.add_argument("--instance", default=socket.gethostname(),
                        help="stable name of this instance; its transactional id fences a predecessor of the same name")
    parser.add_argument("--batch-records", type=int, default=500, help="most input records per transaction")
    parser.add_argument("--settle", type=int, default=3,
                        help="media seconds a cluster of overlapping hits waits for a better hit before it is published")
    parser.add_argument("--archive-size", type=int, default=1_000_000, help="most moments kept for search")
    parser.add_argument("--archive-hours", type=float, default=24.0, help="oldest moments kept for search")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.kafka import ExactlyOnceProcessor, at_least_once_producer, bootstrap_servers, read_committed_consumer
    from pipeline.bus.topics import create_topics, topics
    from pipeline.device import pick_device
    from pipeline.features.sentence import SentenceEncoder
    from pipeline.matching.live import LiveMatcher, text_encoder
    from pipeline.model import moments_ending_at
    from workers import metrics
    from workers.common import error_outgoing, load_model, run_exactly_once, stop_on_signals

    use_threads(args.torch_threads)
    if not args.checkpoint:
        raise SystemExit("vmh query-worker: --checkpoint (VMH_CHECKPOINT) is required")
    model, config, model_id = load_model(args.checkpoint, pick_device(args.device))
    kernels, strides = model.config.kernel_sizes, model.config.strides
    matcher = LiveMatcher(model.config.bits, model_id, text_encoder(model, SentenceEncoder()), settle=args.settle,
                          moments_per_second=lambda second: moments_ending_at(second, kernels, strides),
                          archive_size=args.archive_size, archive_age=args.archive_hours * 3600)
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    group = args.group or f"{args.topic_prefix}-query"
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port)
    worker = QueryWorker(matcher, names, bootstrap, longest_moment=max(model.config.kernel_sizes))
    replies = at_least_once_producer(bootstrap)

    def publish_errors(errors) -> None:
        for error in errors:
            out = error_outgoing(names.errors, error)
            replies.send(out.topic, key=out.key, value=out.value)

    queries = read_committed_consumer([names.queries], bootstrap=bootstrap)
    publish_errors(worker.sync_queries(queries, to_end=True))
    requests = read_committed_consumer([names.search_requests], from_beginning=False, bootstrap=bootstrap)
    processor = ExactlyOnceProcessor([names.moments], group, f"{group}-{args.instance}", worker.transform,
                                     on_assign=worker.restore, on_revoke=worker.forget, bootstrap=bootstrap,
                                     max_poll_records=args.batch_records)
    worker.processor = processor
    stop = stop_on_signals()
    log.info("query worker running", extra={"fields": {"model": model_id, "queries": len(matcher.queries)}})

    def between_batches() -> None:
        publish_errors(worker.sync_queries(queries))
        worker.answer(requests.poll(timeout_ms=0), replies)

    try:
        run_exactly_once(processor, stop, between_batches)
    finally:
        queries.close()
        requests.close()
        replies.close()
    return 0


class QueryWorker:
    """The query worker's transform and rebalance callbacks, and the side channels (queries, search)."""

    def __init__(self, matcher, names, bootstrap: str, longest_moment: int) -> None:
        self.matcher, self.names, self.bootstrap = matcher, names, bootstrap
        self.replay_seconds = matcher.replay_seconds(longest_moment)
        self.processor = None
        self.streams = StreamPartitions()

    def sync_queries(self, consumer, to_end: bool = False) -> list:
        """Apply new records of the queries topic; ``to_end`` reads up to its current end first (at start-up).
        Returns error records for queries that cannot be used."""
        from pipeline.bus.records import MalformedRecord, StandingQuery, decode

        errors = []
        ends = consumer.end_offsets(list(consumer.assignment())) if to_end else {}
        while True:
            changes = []
            for batch in consumer.poll(timeout_ms=200 if to_end else 0).values():
                for record in batch:
                    query_id = record.key.decode("utf-8", "replace") if record.key else ""
                    try:
                        changes.append((query_id, None if record.value is None else decode(record.value, StandingQuery)))
                    except MalformedRecord as e:
                        errors.append(self._bad_query(query_id, f"malformed query record: {e}"))
            errors += self.matcher.apply_queries(changes)
            if not to_end or all(consumer.position(tp) >= end for tp, end in ends.items()):
                return errors

    def answer(self, polled, replies) -> None:
        """Answer search requests with this worker's top-k over the partitions it owns."""
        for batch in polled.values():
            for record in batch:
                try:
                    request = json.loads(record.value)
                    code = bytes.fromhex(request["code"]) if request.get("code") else None
                    hits = self.matcher.search(request.get("text"), None if code is None else list(code),
                                               request.get("since"), request.get("until"), int(request.get("top_k", 10)))
                    reply = {"type": "search_reply", "request_id": request["request_id"], "error": None,
                             "hits": [h._asdict() for h in hits]}
                except Exception as e:  # a bad request gets an answer saying why, never a dead worker
                    reply = {"type": "search_reply", "request_id": _request_id(record.value), "error": str(e), "hits": []}
                owned = sorted(tp.partition for tp in (self.processor.assignment() if self.processor else ()))
                reply["partitions"] = owned
                replies.send(self.names.search_replies, key=record.key, value=json.dumps(reply).encode())
        replies.flush()

    def restore(self, positions) -> None:
        """Partitions arrived: refill the archive and replay the merger from the moments before ``positions``."""
        from pipeline.bus.kafka import offset_for_time, read_range
        from pipeline.bus.records import MalformedRecord, MomentCode, decode

        for tp, next_offset in positions.items():
            if next_offset == 0:
                continue
            last = read_range(tp.topic, tp.partition, next_offset - 1, next_offset, bootstrap=self.bootstrap)
            newest_ms = last[-1].timestamp if last else int(time.time() * 1000)
            age_ms = int((self.matcher.archive.max_age or 3600) * 1000)
            start = offset_for_time(tp.topic, tp.partition, newest_ms - age_ms, bootstrap=self.bootstrap)
            start = max(start, next_offset - self.matcher.archive.capacity)
            archive = []
            for record in read_range(tp.topic, tp.partition, start, next_offset, bootstrap=self.bootstrap):
                try:
                    archive.append(decode(record.value, MomentCode))
                except MalformedRecord:
                    continue
            self.matcher.archive.add(archive)
            newest: dict[str, int] = {}
            for moment in archive:
                newest[moment.stream_id] = max(newest.get(moment.stream_id, 0), moment.end)
                self.streams.note(moment.stream_id, tp.topic, tp.partition)
            # the window is in media seconds of each stream: record time stalls when an upstream worker restarts
            self.matcher.process([m for m in archive if m.end > newest[m.stream_id] - self.replay_seconds], emit=False)

    def forget(self, partitions) -> None:
        """Partitions left: their streams' merger state goes with them (the archive keeps what it has)."""
        for stream_id in self.streams.take(partitions):
            self.matcher.merger.drop(stream_id)

    def transform(self, batch):
        from pipeline.bus.records import MomentCode
        from workers import metrics
        from workers.common import decode_batch, error_outgoing, outgoing

        started = time.perf_counter()
        decoded, out = decode_batch(batch, MomentCode, self.names.errors)
        for record, moment in decoded:
            self.streams.note(moment.stream_id, record.topic, record.partition)
        events, errors = self.matcher.process([moment for _, moment in decoded])
        out += [error_outgoing(self.names.errors, e) for e in errors]
        out += [outgoing(self.names.matches, e) for e in events]
        metrics.BATCH_SIZE.labels("matcher").observe(len(batch))
        metrics.STAGE_LATENCY.labels("matcher").observe(time.perf_counter() - started)
        metrics.MATCHES.inc(len(events))
        now = time.time()
        for event in events:
            metrics.END_TO_END.observe(now - event.capture_time)
        return out

    def _bad_query(self, query_id: str, message: str):
        from pipeline.bus.records import BAD_QUERY, ErrorRecord

        return ErrorRecord(source=query_id or "unknown", kind=BAD_QUERY, message=message, time=time.time())


def _request_id(value: bytes | None) -> str:
    try:
        return str(json.loads(value)["request_id"])
    except Exception:
        return ""
