"""`vmh query-worker`: moment codes in, match events out, exactly once; and retrospective search.

A thin loop around :class:`pipeline.matching.live.LiveMatcher`, which owns the state. Between batches the worker
applies changes from the log-compacted queries topic (read whole by every query worker, no consumer group) and
answers search requests. Moments are consumed in a consumer group and their match events committed in one Kafka
transaction with the batch's offsets. When partitions arrive (start, restart, rebalance) the worker reads their
recent moments and hands them to the matcher, which replaces their archives and replays its merger from them.

Search goes over a reply topic rather than HTTP (``pipeline.matching.search``): each query worker holds only the
moments of its own partitions, so a request is broadcast on ``<prefix>.search-requests`` and every worker answers
on ``<prefix>.search-replies`` with its top-k and the partitions it holds completely; the client merges replies
until every partition is covered. No service discovery, and it scales out with the consumer group.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time

from pipeline.settings import add_settings

log = logging.getLogger(__name__)
RESTORE_PROGRESS_S = 5.0  # seconds between progress lines of a partition's restore
# restores run between polls: a day of moments on a partition reads for minutes (kafka-python parses ~40k records/s),
# and a member that does not poll for max_poll_interval_ms leaves the group, which would restart the restore
RESTORE_POLL_INTERVAL_MS = 30 * 60 * 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "checkpoint", "device", "torch-threads", "bootstrap-servers", "topic-prefix", "metrics-port",
                 "metrics-address", "health-deadline", "stream-idle-timeout", "bus-timeout")
    add_settings(parser, "matching-kernel", "archive-size", "archive-hours")
    parser.add_argument("--group", default=None,
                        help="consumer group of the query workers [default: <topic-prefix>-query]")
    parser.add_argument("--instance", default=socket.gethostname(),
                        help="stable name of this instance; its transactional id fences a predecessor of the same name")
    parser.add_argument("--batch-records", type=int, default=500, help="most input records per transaction")
    parser.add_argument("--settle", type=int, default=3,
                        help="media seconds a cluster of overlapping hits waits for a better hit before it is published")


def run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from pipeline.bus.kafka import BusError, CheckedProducer, ExactlyOnceProcessor, bootstrap_servers, \
        read_committed_consumer
    from pipeline.bus.topics import create_topics, topics
    from pipeline.device import pick_device
    from pipeline.features.sentence import SentenceEncoder
    from pipeline.matching.live import LiveMatcher, text_encoder
    from pipeline.model import moments_ending_at
    from workers import metrics
    from workers.common import EXIT_BUS, load_model, poison_errors, run_exactly_once, stop_on_signals, use_threads

    use_threads(args.torch_threads)
    if not args.checkpoint:
        raise SystemExit("vmh query-worker: --checkpoint (VMH_CHECKPOINT) is required")
    model, config, model_id = load_model(args.checkpoint, pick_device(args.device))
    kernels, strides = model.config.kernel_sizes, model.config.strides
    matcher = LiveMatcher(model.config.bits, model_id, text_encoder(model, SentenceEncoder()), settle=args.settle,
                          threshold=config.get("threshold"), moments_per_second=lambda second: moments_ending_at(second, kernels, strides),
                          longest_moment=max(kernels), archive_size=args.archive_size,
                          archive_age=args.archive_hours * 3600, idle_timeout=args.stream_idle_timeout,
                          kernel=args.matching_kernel)
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    group = args.group or f"{args.topic_prefix}-query"
    create_topics(bootstrap, prefix=args.topic_prefix)
    metrics.serve(args.metrics_port, args.metrics_address, args.health_deadline)
    side = CheckedProducer(bootstrap, args.bus_timeout, on_failure=lambda error: metrics.DELIVERY_ERRORS.inc())
    worker = QueryWorker(matcher, names, bootstrap, side)
    stop = stop_on_signals()
    queries = read_committed_consumer([names.queries], bootstrap=bootstrap)
    requests = read_committed_consumer([names.search_requests], from_beginning=False, bootstrap=bootstrap)
    try:
        worker.sync_queries(queries, to_end=True)
        processor = ExactlyOnceProcessor([names.moments], group, f"{group}-{args.instance}", worker.transform,
                                         on_assign=worker.restore, on_revoke=matcher.forget,
                                         poison=poison_errors(names.errors), timeout_s=args.bus_timeout,
                                         bootstrap=bootstrap, max_poll_records=args.batch_records,
                                         consumer_config={"max_poll_interval_ms": RESTORE_POLL_INTERVAL_MS})
        log.info("query worker running", extra={"fields": {"model": model_id, "queries": len(matcher.queries)}})

        def between_batches() -> None:
            worker.sync_queries(queries)
            worker.answer(requests.poll(timeout_ms=0))

        return run_exactly_once(processor, stop, between_batches)
    except (BusError, KafkaError) as e:  # before the loop runs: reading the queries, joining the group
        log.error("giving up on the bus: %s; exiting with code %d", e, EXIT_BUS)
        return EXIT_BUS
    finally:
        queries.close(timeout_ms=3000)
        requests.close(timeout_ms=3000)
        side.close()


class QueryWorker:
    """The query worker's transform and partition arrivals, and the side channels (queries, search), whose error
    records and replies go out through ``side``, a checked producer."""

    def __init__(self, matcher, names, bootstrap: str, side) -> None:
        self.matcher, self.names, self.bootstrap, self.side = matcher, names, bootstrap, side

    def sync_queries(self, consumer, to_end: bool = False) -> None:
        """Apply new records of the queries topic; ``to_end`` reads up to its current end first (at start-up).
        Queries that cannot be used become error records."""
        from pipeline.bus.records import BAD_QUERY, MalformedRecord, StandingQuery, decode, key_text
        from workers.common import error_at, origin

        errors = []
        ends = consumer.end_offsets(list(consumer.assignment())) if to_end else {}
        while True:
            changes, origins = [], []
            for batch in consumer.poll(timeout_ms=200 if to_end else 0).values():
                for record in batch:
                    try:
                        query = None if record.value is None else decode(record.value, StandingQuery)
                        changes.append((key_text(record.key, "unknown"), query))
                        origins.append(origin(record))
                    except MalformedRecord as e:
                        errors.append(error_at(record, BAD_QUERY, f"malformed query record: {e}"))
            errors += self.matcher.apply_queries(changes, origins)
            if not to_end or all(consumer.position(tp) >= end for tp, end in ends.items()):
                break
        self._publish_errors(errors)

    def answer(self, polled) -> None:
        """Answer search requests with this worker's top-k over the partitions it holds completely. Whatever a
        request holds, it gets a reply that fits the producer's size limit (an error saying why, if need be), and
        nothing but that reply, built and checked here, goes to the producer."""
        errors = []
        for batch in polled.values():
            for record in batch:
                reply = self._reply(record, errors)
                if reply is not None:
                    self.side.send(reply)
        self._publish_errors(errors)
        self.side.flush()

    def _reply(self, record, errors: list):
        """The reply to one request (None when it has no usable request id); an error record when it fails."""
        from pipeline.bus.kafka import Outgoing
        from pipeline.matching.search import BAD_SEARCH_REQUEST, BadSearchRequest, SearchRequest, encode_reply
        from workers.common import error_at

        limit = self.side.max_request_size - 4096  # room for the record's key, headers and batch overhead
        partitions = [partition for _, partition in self.matcher.held_partitions()]
        request_id = None
        try:
            request = SearchRequest.decode(record.value)
            request_id = request.request_id
            code = None if request.code is None else list(request.code)
            hits = self.matcher.search(request.text, code, request.since, request.until, request.top_k)
            value = encode_reply(request_id, [h._asdict() for h in hits], partitions, None, limit)
        except Exception as e:  # a bad request gets an answer saying why, never a dead worker
            request_id = request_id or (e.request_id if isinstance(e, BadSearchRequest) else None)
            errors.append(error_at(record, BAD_SEARCH_REQUEST, str(e)))
            if request_id is None:
                return None  # no one to answer
            value = encode_reply(request_id, [], partitions, str(e), limit)
        return Outgoing(self.names.search_replies, value, request_id.encode())

    def restore(self, positions) -> None:
        """Partitions arrived: hand the matcher each one's recent moments (its archive window, back from the
        position this worker resumes at), read and decoded chunk by chunk, with progress logged."""
        from pipeline.bus.kafka import offset_for_time, read_range

        for tp, next_offset in positions.items():
            start = max(0, next_offset - self.matcher.archive_size)
            if next_offset > 0 and self.matcher.archive_age is not None:
                last = read_range(tp.topic, tp.partition, next_offset - 1, next_offset, bootstrap=self.bootstrap)
                newest_ms = last[-1].timestamp if last else int(time.time() * 1000)
                since_ms = newest_ms - int(self.matcher.archive_age * 1000)
                start = max(start, offset_for_time(tp.topic, tp.partition, since_ms, bootstrap=self.bootstrap))
            started = time.monotonic()
            archived = self.matcher.restore(tp, self._moments(tp, start, next_offset))
            log.info("partition restored", extra={"fields": {
                "topic": tp.topic, "partition": tp.partition, "moments": archived,
                "seconds": round(time.monotonic() - started, 1)}})

    def _moments(self, tp, start: int, end: int):
        """The moments of offsets [start, end) of a partition, a chunk of columns at a time (records that are not
        moments of the matcher's code length left out); progress every few seconds."""
        from pipeline.bus.kafka import read_chunks
        from pipeline.bus.records import decode_moments
        from workers import metrics

        if start >= end:
            return
        log.info("restoring partition", extra={"fields": {
            "topic": tp.topic, "partition": tp.partition, "from_offset": start, "to_offset": end}})
        began = reported = time.monotonic()
        done = 0
        for chunk in read_chunks(tp.topic, tp.partition, start, end, bootstrap=self.bootstrap,
                                 timeout_s=self.side.timeout_s):
            yield decode_moments([record.value or b"" for record in chunk], self.matcher.bits)
            metrics.HEARTBEAT.beat()  # a restore that reads is alive: /healthz must not fail it for its length
            done = chunk[-1].offset + 1 - start
            if time.monotonic() - reported >= RESTORE_PROGRESS_S:
                reported, rate = time.monotonic(), done / max(time.monotonic() - began, 1e-9)
                log.info("restoring partition", extra={"fields": {
                    "topic": tp.topic, "partition": tp.partition, "offsets_read": done, "offsets": end - start,
                    "percent": round(100 * done / (end - start), 1), "records_per_s": round(rate),
                    "eta_s": round((end - start - done) / rate, 1)}})

    def transform(self, batch):
        from pipeline.bus.records import MomentCode
        from workers import metrics
        from workers.common import decode_batch, error_outgoing, outgoing

        started = time.perf_counter()
        decoded, origins, out = decode_batch(batch, MomentCode, self.names.errors)
        events, errors = self.matcher.process(decoded, origins)
        out += [error_outgoing(self.names.errors, e) for e in errors]
        out += [outgoing(self.names.matches, e) for e in events]
        metrics.BATCH_SIZE.labels("matcher").observe(len(batch))
        metrics.STAGE_LATENCY.labels("matcher").observe(time.perf_counter() - started)
        metrics.MATCHES.inc(len(events))
        metrics.STREAMS.labels("query-worker").set(len(self.matcher))
        now = time.time()
        for event in events:
            metrics.END_TO_END.observe(now - event.capture_time)
        return out

    def _publish_errors(self, errors) -> None:
        from workers.common import error_outgoing

        for error in errors:
            self.side.send(error_outgoing(self.names.errors, error))
