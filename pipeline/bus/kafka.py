"""The bus: kafka-python clients whose names say what they deliver.

- ``at_least_once_producer``: an idempotent producer with ``acks=all``. Retries never duplicate a record, but a
  process that dies between ``send`` and recording its own progress sends that record again when it restarts.
- ``ExactlyOnceProcessor``: the consume-transform-produce loop of the encoder and the query worker. Each polled
  batch and the consumer offsets that cover it are committed in one Kafka transaction, so with read_committed
  readers every output appears once, even when a worker is killed and restarted or its partitions move.
- ``read_committed_consumer``: a consumer that never sees records of aborted or still-open transactions.
- ``read_range`` and ``offset_for_time``: re-read part of a partition, e.g. to rebuild per-stream state when a
  partition is assigned to a new owner.

Keys and values are bytes throughout; (de)serialisation belongs to the callers. Every client here connects with
the security settings of ``pipeline.bus.security.client_config`` (SASL, TLS, client id).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from kafka import (
    ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition,
)
from kafka.consumer.fetcher import ConsumerRecord
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError
from kafka.structs import MemberState

from pipeline.bus.security import client_config, describe
from pipeline.settings import resolve

log = logging.getLogger(__name__)
KafkaClient = TypeVar("KafkaClient", KafkaAdminClient, KafkaConsumer, KafkaProducer)


class BusError(RuntimeError):
    """The bus cannot be reached or a transaction cannot continue."""


class BusTimeout(BusError):
    """A blocking Kafka call did not complete within its deadline (e.g. the broker died mid-commit)."""


@dataclass(frozen=True)
class Outgoing:
    """One record a transform wants produced. ``timestamp_ms=None`` lets the producer stamp it."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None


def bootstrap_servers(explicit: str | None = None) -> str:
    """``explicit``, else the ``bootstrap-servers`` setting, else the local broker that `vmh broker start` recorded."""
    value = explicit or resolve("bootstrap-servers")
    if value:
        return value
    from pipeline.bus.broker import broker_status

    state = broker_status()
    if state is None:
        raise BusError("no Kafka broker: set --bootstrap-servers (VMH_BOOTSTRAP_SERVERS) or start the local one "
                       f"with `vmh broker start` (port {resolve('broker-port')})")
    return state.bootstrap


def connect(client_class: type[KafkaClient], bootstrap: str | None = None, **config) -> KafkaClient:
    """``client_class`` (a kafka-python producer, consumer or admin client) for the configured cluster, with the
    security settings applied. A cluster that cannot be reached within ``bootstrap_timeout_ms`` raises
    ``BusError`` naming the servers and how we tried to log in, the usual cause on a secured cluster."""
    servers = bootstrap_servers(bootstrap)
    security = client_config()
    try:
        return client_class(bootstrap_servers=servers, **security, **config)
    except KafkaTimeoutError as e:
        raise BusError(f"cannot connect to Kafka at {servers} with {describe(security)} ({e}); check "
                       "--bootstrap-servers and the [kafka] settings in vmh.toml or VMH_KAFKA_* (security "
                       "protocol, SASL mechanism and credentials, TLS files)") from e


def admin_client(bootstrap: str | None = None, **config) -> KafkaAdminClient:
    return connect(KafkaAdminClient, bootstrap, **config)


def at_least_once_producer(bootstrap: str | None = None, **config) -> KafkaProducer:
    """An idempotent producer (``acks=all``): every acknowledged record is stored once, per producer session."""
    return connect(KafkaProducer, bootstrap, acks="all", enable_idempotence=True, linger_ms=5, **config)


class CheckedProducer:
    """An at-least-once producer whose deliveries are checked, for records outside the exactly-once loops (feature
    records, search replies, error records of the side channels).

    A record that cannot be delivered (refused, or the broker unreachable for ``timeout_s``) is reported to
    ``on_failure`` and makes the next ``send`` or ``flush`` raise ``BusError``; ``flush`` waits at most
    ``timeout_s``. So a producer that cannot deliver stops instead of dropping records unnoticed.
    """

    def __init__(self, bootstrap: str | None = None, timeout_s: float = 30.0,
                 on_failure: Callable[[Exception], None] = lambda error: None, **config) -> None:
        deadline_ms = int(timeout_s * 1000)
        self.timeout_s, self._on_failure = timeout_s, on_failure
        self.producer = at_least_once_producer(bootstrap, max_block_ms=deadline_ms, delivery_timeout_ms=deadline_ms,
                                               request_timeout_ms=min(30_000, deadline_ms // 2), **config)
        self.max_request_size: int = self.producer.config["max_request_size"]
        self._failure: Exception | None = None

    def send(self, out: Outgoing) -> None:
        self._raise_failure()
        try:
            future = self.producer.send(out.topic, value=out.value, key=out.key, headers=list(out.headers),
                                        timestamp_ms=out.timestamp_ms)
        except KafkaTimeoutError as e:
            raise BusTimeout(f"no metadata for topic {out.topic!r} within {self.timeout_s:g} s: {e}") from e
        future.add_errback(self._failed)

    def flush(self) -> None:
        try:
            self.producer.flush(timeout=self.timeout_s)
        except KafkaTimeoutError as e:
            raise BusTimeout(f"records not delivered within {self.timeout_s:g} s") from e
        self._raise_failure()

    def close(self, timeout_s: float = 3.0) -> None:
        close_producer(self.producer, timeout_s)

    def _failed(self, error: Exception) -> None:  # on kafka-python's IO thread
        self._on_failure(error)
        if self._failure is None:
            self._failure = error

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise BusError(f"a record could not be delivered: {self._failure!r}")


def close_producer(producer: KafkaProducer, timeout_s: float) -> None:
    """Close ``producer`` within about ``timeout_s``, also when its records cannot be delivered (the broker is gone):
    kafka-python's ``close`` then raises from its flush and leaves the sender thread running, so stop it here."""
    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        log.warning("producer closed with records undelivered after %g s", timeout_s)
        producer._sender.force_close()
        producer._closed = True


def read_committed_consumer(
    topics: Sequence[str], group_id: str | None = None, *, from_beginning: bool = True, bootstrap: str | None = None,
    **config,
) -> KafkaConsumer:
    """A consumer that sees only committed records.

    With ``group_id`` the topics' partitions are shared among the group's members and offsets are committed
    automatically after records are handed out (at-least-once, if a batch is finished before the next poll).
    Without it the consumer reads every partition of ``topics`` and commits nothing: what a query worker needs to
    rebuild the full set of standing queries. ``from_beginning`` picks where reading starts when no offset is
    committed.
    """
    consumer = connect(
        KafkaConsumer, bootstrap, group_id=group_id, isolation_level="read_committed",
        auto_offset_reset="earliest" if from_beginning else "latest", allow_auto_create_topics=False,
        # without a group there is nothing to commit (and kafka-python warns about it on every consumer)
        **{"enable_auto_commit": group_id is not None, **config},
    )
    if group_id is not None:
        consumer.subscribe(list(topics))
        return consumer
    partitions = []
    for topic in topics:
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            consumer.close()
            raise BusError(f"topic {topic!r} does not exist (create it with pipeline.bus.topics.create_topics)")
        partitions += [TopicPartition(topic, p) for p in sorted(ids)]
    consumer.assign(partitions)
    return consumer


def read_range(
    topic: str, partition: int, start_offset: int, end_offset: int, *, bootstrap: str | None = None,
    timeout_s: float = 30.0,
) -> list[ConsumerRecord]:
    """The committed records of one partition with ``start_offset <= offset < end_offset``, in offset order
    (``read_chunks``, all at once)."""
    return [record for chunk in read_chunks(topic, partition, start_offset, end_offset, bootstrap=bootstrap,
                                            timeout_s=timeout_s) for record in chunk]


MIN_READ_RATE = 2000.0  # records/s a long read is allowed to average before it is given up


def read_chunks(
    topic: str, partition: int, start_offset: int, end_offset: int, *, bootstrap: str | None = None,
    timeout_s: float = 30.0, chunk: int = 50_000,
) -> Iterator[list[ConsumerRecord]]:
    """The committed records of one partition with ``start_offset <= offset < end_offset``, in offset order, in
    lists of about ``chunk`` records, so that a long range (a day of moments) is never held whole.

    The range is clipped to what the partition holds (retention may have dropped its start; the end stops at the
    last stable offset, before any open transaction). Offsets of aborted records and transaction markers are
    skipped, so fewer than ``end_offset - start_offset`` records is normal. The read gives up (``BusError``) when
    no record arrives for ``timeout_s``, or when it takes longer than ``timeout_s`` plus the range at
    ``MIN_READ_RATE``: a deadline that grows with the range, so a long read finishes and a stuck one ends.
    """
    if start_offset < 0 or end_offset < start_offset:
        raise ValueError(f"bad offset range [{start_offset}, {end_offset})")
    tp = TopicPartition(topic, partition)
    consumer = _partition_reader(tp, bootstrap)
    try:
        start = max(start_offset, consumer.beginning_offsets([tp])[tp])
        end = min(end_offset, consumer.end_offsets([tp])[tp])
        if start >= end:
            return
        consumer.seek(tp, start)
        began = time.monotonic()
        deadline, progress, position = began + timeout_s + (end - start) / MIN_READ_RATE, began, start
        records: list[ConsumerRecord] = []
        while position < end:
            now = time.monotonic()
            if now > deadline or now - progress > timeout_s:
                raise BusError(f"reading {topic}[{partition}] offsets [{start}, {end}) gave up after "
                               f"{now - began:.0f} s at offset {position}")
            records += [record for record in consumer.poll(timeout_ms=200).get(tp, []) if record.offset < end]
            if consumer.position(tp) > position:
                position, progress = consumer.position(tp), time.monotonic()
            if len(records) >= chunk:
                yield records
                records = []
        if records:
            yield records
    finally:
        consumer.close(autocommit=False)


def offset_for_time(topic: str, partition: int, timestamp_ms: int, *, bootstrap: str | None = None) -> int:
    """The first offset whose record timestamp is >= ``timestamp_ms`` (the end offset if there is none)."""
    tp = TopicPartition(topic, partition)
    consumer = _partition_reader(tp, bootstrap)
    try:
        found = consumer.offsets_for_times({tp: timestamp_ms})[tp]
        return found.offset if found is not None else consumer.end_offsets([tp])[tp]
    finally:
        consumer.close(autocommit=False)


def _partition_reader(tp: TopicPartition, bootstrap: str | None) -> KafkaConsumer:
    """A group-less read_committed consumer assigned to one partition, for short reads."""
    consumer = connect(KafkaConsumer, bootstrap, group_id=None, isolation_level="read_committed",
                       enable_auto_commit=False, allow_auto_create_topics=False)
    consumer.assign([tp])
    return consumer


Transform = Callable[[list[ConsumerRecord]], Iterable[Outgoing]]


class ExactlyOnceProcessor:
    """Consume ``topics`` in a consumer group, transform each polled batch, produce the results in a transaction.

    One transaction holds a batch's outputs and the group offsets just past it (``send_offsets_to_transaction``
    with the consumer's group metadata, so a member that was rebalanced away is fenced, KIP-447). Readers with
    read_committed therefore see each output exactly once.

    ``transform(records)`` gets one poll's records (grouped by partition, in offset order within each) and returns
    or yields the ``Outgoing`` records to produce. If anything fails, the transaction is aborted and the batch's
    partitions are rewound to their committed offsets. A Kafka error is logged and the batch is retried on the next
    ``process_once``; a fatal one (e.g. fenced by a newer instance) raises ``BusError``.

    Poison records: with ``poison(record, error)``, an exception from ``transform`` does not propagate. The failed
    batch's records are retried one per transaction, and a record that fails ``max_attempts`` times on its own is
    replaced by what ``poison`` returns (an error record naming it) in a transaction that commits past it, so one
    record can never stop the loop, nor stop it again after a restart. Without ``poison`` the exception propagates.

    Deadlines: committing, sending offsets and aborting wait at most ``timeout_s``, and a consumer without a group
    coordinator (the broker is gone) for that long gives up too; both raise ``BusTimeout``, after which the
    processor is unusable. Exactly-once recovery makes ending the process then the safe response.

    Per-partition state: ``on_revoke(partitions)`` is called (in the processing thread, between batches) when
    partitions leave this member, and ``on_assign({partition: next_offset})`` before the first batch of newly owned
    partitions, so the caller can rebuild state from the log, e.g. with ``read_range(..., end_offset=next_offset)``.
    After an abort, the batch's partitions go through the same revoke/assign pair, so state that the transform had
    already advanced is rebuilt rather than reused.

    ``transactional_id`` must be stable per worker instance (e.g. ``"encoder-0"``): a restarted instance with the
    same id fences its predecessor and aborts the transaction it left open at once. It is also the consumer's
    static group membership id (KIP-345), so the restarted instance takes its predecessor's place in the group at
    once instead of waiting for the dead member's session to expire. The price: an instance that stops for good
    keeps its partitions until ``session_timeout_ms`` (45 s by default; set it in ``consumer_config``) and leaves
    its open transaction, if any, to expire after ``transaction_timeout_ms``, holding back read_committed readers
    of the output partitions until then. Pass ``consumer_config={"group_instance_id": None}`` for dynamic
    membership.
    """

    def __init__(
        self,
        topics: Sequence[str],
        group_id: str,
        transactional_id: str,
        transform: Transform,
        *,
        on_assign: Callable[[dict[TopicPartition, int]], None] | None = None,
        on_revoke: Callable[[set[TopicPartition]], None] | None = None,
        poison: Callable[[ConsumerRecord, Exception], Iterable[Outgoing]] | None = None,
        max_attempts: int = 3,
        timeout_s: float = 30.0,
        bootstrap: str | None = None,
        max_poll_records: int = 500,
        transaction_timeout_ms: int = 10_000,
        consumer_config: dict | None = None,
        producer_config: dict | None = None,
    ) -> None:
        servers, security = bootstrap_servers(bootstrap), client_config()
        self._transform, self._on_assign, self._on_revoke = transform, on_assign, on_revoke
        self._poison, self._max_attempts, self._timeout_s = poison, max_attempts, timeout_s
        self._suspects: dict[TopicPartition, int] = {}  # partition -> end offset of a failed batch, retried singly
        self._failures: dict[tuple[TopicPartition, int], tuple[int, Exception]] = {}  # record -> (failures, last)
        self._coordinator_lost: float | None = None  # monotonic time since when the group has no coordinator
        self._producer = KafkaProducer(
            bootstrap_servers=servers, transactional_id=transactional_id, transaction_timeout_ms=transaction_timeout_ms,
            acks="all", max_block_ms=int(timeout_s * 1000), **security, **(producer_config or {}),
        )
        try:
            # before the consumer fetches committed offsets: this waits for a predecessor's half-committed transaction
            self._producer.init_transactions()
            self._consumer = KafkaConsumer(
                bootstrap_servers=servers, group_id=group_id, isolation_level="read_committed",
                enable_auto_commit=False, max_poll_records=max_poll_records, allow_auto_create_topics=False, **security,
                **{"auto_offset_reset": "earliest", "partition_assignment_strategy": [CooperativeStickyAssignor],
                   # a fetch gathers what arrives for 0.25 s: a transaction costs the broker the same few requests and
                   # markers whatever it holds, so one per arriving record made the broker the largest CPU user
                   # after decoding (vmh bench e2e)
                   "fetch_max_wait_ms": 250, "fetch_min_bytes": 1 << 20,
                   "group_instance_id": transactional_id, **(consumer_config or {})},
            )
        except BaseException:
            self._producer.close()
            raise
        self._moves = _RevocationLog()
        for topic in topics:  # metadata first: a group leader without it assigns nothing, and may not rejoin
            self._consumer.partitions_for_topic(topic)
        self._consumer.subscribe(list(topics), listener=self._moves)
        self._owned: set[TopicPartition] = set()

    def process_once(self, timeout_ms: int = 1000) -> int:
        """Poll once and commit what came in as one transaction; return how many records were consumed."""
        polled = self._consumer.poll(timeout_ms=timeout_ms)
        self._check_coordinator()
        self._finish_lost_join()
        try:
            self._apply_moves(polled)
        except BaseException:
            self._rewind(polled)  # the partitions are re-announced, and their records polled again, next time
            raise
        polled = self._isolate({tp: records for tp, records in polled.items() if tp in self._owned and records})
        if not polled:
            return 0
        batch = [record for records in polled.values() for record in records]
        offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1) for tp, records in polled.items()}
        self._producer.begin_transaction()
        try:
            for out in self._outputs(batch):
                self._producer.send(out.topic, value=out.value, key=out.key, headers=list(out.headers),
                                    timestamp_ms=out.timestamp_ms)
            manager = self._producer._transaction_manager  # the public calls below have no deadline
            self._wait(lambda: manager.send_offsets_to_transaction(offsets, self._consumer.group_metadata()),
                       "sending the offsets to the transaction")
            self._wait(manager.begin_commit, "committing the transaction")
        except CommitFailedError as e:  # the group no longer knows this member or its generation
            self._abort_and_rewind(polled, e)
            self._consumer._coordinator.request_rejoin()  # now, not at the next heartbeat (if that ever comes)
            log.warning("transaction of %d records aborted and rewound, rejoining group %s: %r", len(batch),
                        self._consumer.config["group_id"], e)
            return 0
        except KafkaError as e:
            self._abort_and_rewind(polled, e)
            log.warning("transaction of %d records aborted and rewound: %r", len(batch), e)
            return 0
        except BusError:
            raise  # a deadline passed or the bus failed: no fault of the records, and nothing more to try here
        except Exception as e:
            self._abort_and_rewind(polled, e)
            if self._poison is None:
                raise
            self._note_failure(polled, e)
            return 0
        except BaseException as e:
            self._abort_and_rewind(polled, e)
            raise
        for record in batch:
            self._failures.pop((TopicPartition(record.topic, record.partition), record.offset), None)
        return len(batch)

    def run(self, stop: threading.Event | None = None, poll_timeout_ms: int = 1000) -> None:
        """Process batches until ``stop`` is set (forever without one), then close."""
        try:
            while stop is None or not stop.is_set():
                self.process_once(poll_timeout_ms)
        finally:
            self.close()

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns (as of the last batch)."""
        return set(self._owned)

    def lag(self) -> dict[TopicPartition, int]:
        """Records not yet handed to ``transform`` per owned partition, from the last fetch's high watermark
        (no request: a blocking ListOffsets call here could stall the processing loop)."""
        lags = {}
        for tp in self._owned:
            high = self._consumer.highwater(tp)
            if high is not None:
                lags[tp] = max(0, high - self._consumer.position(tp))
        return lags

    def close(self, timeout_s: float = 3.0) -> None:
        """Close both clients, within about ``2 * timeout_s`` even when the broker is gone."""
        self._consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))
        close_producer(self._producer, timeout_s)

    def __enter__(self) -> ExactlyOnceProcessor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _apply_moves(self, polled: dict) -> None:
        """Tell the caller which partitions left (revoked or lost) and which arrived, and where the latter resume."""
        current = self._consumer.assignment()
        gone = (self._owned & self._moves.take()) | (self._owned - current)
        if gone:
            self._owned -= gone
            if self._on_revoke is not None:
                self._on_revoke(gone)
        arrived = current - self._owned
        if arrived:
            positions = {tp: polled[tp][0].offset if polled.get(tp) else self._consumer.position(tp) for tp in arrived}
            if self._on_assign is not None:
                self._on_assign(positions)
            self._owned |= arrived

    def _outputs(self, batch: list[ConsumerRecord]) -> Iterable[Outgoing]:
        """The transform's outputs, or for a record that failed ``max_attempts`` times alone, the poison's."""
        if len(batch) == 1:
            record = batch[0]
            failures, error = self._failures.get((TopicPartition(record.topic, record.partition), record.offset),
                                                 (0, None))
            if failures >= self._max_attempts:
                log.error("%s[%d]@%d failed %d times: %r; committing past it", record.topic, record.partition,
                          record.offset, failures, error)
                return list(self._poison(record, error))
        return self._transform(batch)

    def _isolate(self, polled: dict) -> dict:
        """While a failed batch is retried, take one of its records per transaction and rewind the rest."""
        for tp in [tp for tp, end in self._suspects.items() if tp in polled and polled[tp][0].offset >= end]:
            del self._suspects[tp]
        suspect = next((tp for tp in polled if tp in self._suspects), None)
        if suspect is None:
            return polled
        self._rewind({tp: records if tp != suspect else records[1:] for tp, records in polled.items()})
        return {suspect: polled[suspect][:1]}

    def _note_failure(self, polled: dict, error: Exception) -> None:
        batch = [record for records in polled.values() for record in records]
        if len(batch) > 1:
            for tp, records in polled.items():
                self._suspects[tp] = records[-1].offset + 1
            log.warning("transform failed on a batch of %d records: %r; retrying them one by one", len(batch), error)
            return
        key = (TopicPartition(batch[0].topic, batch[0].partition), batch[0].offset)
        failures = self._failures.get(key, (0, None))[0] + 1
        self._failures[key] = (failures, error)
        log.warning("transform failed on %s[%d]@%d (%d of %d attempts): %r", key[0].topic, key[0].partition,
                    key[1], failures, self._max_attempts, error)

    def _wait(self, begin: Callable, what: str) -> None:
        """Start a transaction step (a kafka-python TransactionalRequestResult) and wait for it, with a deadline."""
        result = begin()
        self._producer._sender.wakeup()
        if not result.wait(timeout_ms=self._timeout_s * 1000):
            raise BusTimeout(f"{what} did not complete within {self._timeout_s:g} s")

    def _finish_lost_join(self) -> None:
        """Rejoin when kafka-python (3.0.12) has lost a join. A rejoin that a metadata change asked for, and whose
        round trip outlives the poll that started it, completes unseen: the leader's own assignment clears what asked
        for it, so no later poll finishes the join. The member then stays REBALANCING with its heartbeats off until
        the broker drops it at the session timeout, never rejoins, and every transaction after that fails with
        UnknownMemberId. Every member's first join is followed by such a rejoin, and on a loaded machine its round
        trip outlived the 0.2 s poll (in `vmh demo`, moment recall fell to 0.07-0.35). Asking again runs a join to
        the end, keeping the partitions (cooperative): nothing is revoked."""
        coordinator = self._consumer._coordinator
        if self._consumer.group_metadata().state is MemberState.REBALANCING and not coordinator.need_rejoin():
            log.info("group %s: a join finished unseen; rejoining", self._consumer.config["group_id"])
            coordinator.request_rejoin()

    def _check_coordinator(self) -> None:
        """Give up when the group has had no reachable coordinator for ``timeout_s`` (a dead broker, a partition
        of the network): polls then come back empty forever, and the worker would look alive while doing nothing."""
        if not self._consumer._coordinator.coordinator_unknown():
            self._coordinator_lost = None
        elif self._coordinator_lost is None:
            self._coordinator_lost = time.monotonic()
        elif time.monotonic() - self._coordinator_lost > self._timeout_s:
            raise BusTimeout(f"no reachable group coordinator for {self._timeout_s:g} s")

    def _abort_and_rewind(self, polled: dict, cause: BaseException) -> None:
        try:
            self._wait(self._producer._transaction_manager.begin_abort, "aborting the transaction")
        except BusTimeout:
            raise
        except Exception as e:
            raise BusError(f"cannot abort the transaction after {cause!r}; this processor must be recreated") from e
        self._rewind(polled)
        rewound = set(polled) & self._owned
        self._owned -= rewound  # re-announced by on_assign on the next batch
        if rewound and self._on_revoke is not None:
            self._on_revoke(rewound)

    def _rewind(self, polled: dict) -> None:
        """Seek back to the first polled record of each still-assigned partition, so no record is skipped."""
        assigned = self._consumer.assignment()
        for tp, records in polled.items():
            if tp in assigned and records:
                self._consumer.seek(tp, records[0].offset)


class _RevocationLog(ConsumerRebalanceListener):
    """Records revoked (or lost) partitions. The callbacks run on kafka-python's IO thread, where blocking work
    would stall heartbeats, so the processor acts on them in its own thread between batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked) -> None:
        with self._lock:
            self._revoked |= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        pass

    def take(self) -> set[TopicPartition]:
        with self._lock:
            taken, self._revoked = self._revoked, set()
        return taken
