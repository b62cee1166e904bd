"""CDC sinks: one per target store, each consuming the cdc-* topics in its own Kafka consumer group
(`knowton-sink-<store>`), writing its store in batches, then committing.

At-least-once and nothing lost (docs/architecture.md, "Nothing lost, nothing hidden"): offsets are committed only
after every record of a batch is written or durably dead-lettered; a store that is down is retried with backoff
and never dead-letters anything; only records that can never be applied go to the store's DLQ. Each store has its
own group, offsets, retries and DLQ, so an outage of one never holds the other back.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import elastic_transport
import psycopg
from clickhouse_connect.driver import exceptions as ch_errors
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from elasticsearch import ApiError

from knowton_pipeline.catalog import CDC_TABLES, Dependency, SyncedTable, UnknownTableError, documents_fed_by
from knowton_pipeline.catalog import table as catalog_table
from knowton_pipeline.lib.debezium import (
    ChangeColumns,
    ChangeEvent,
    MalformedEventError,
    decode_event,
    read_change_columns,
    table_for_topic,
)
from knowton_pipeline.lib.maintenance import check_not_below_horizon, purge_horizon
from knowton_pipeline.lib.stores import TARGETS, TargetStore, TransientStoreError, WriteItem, WriteOutcome, Writer
from knowton_pipeline.lib.stores.base import Prepared
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.positions import check_source_not_behind, source_position
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import all_keys, document_items, linked_keys

log = logging.getLogger(__name__)

LEGACY_GROUP = "knowton-sync"  # the one group both stores shared before each had its own sink
HORIZON_READ_SECONDS = 60.0  # how often a running sink reads the purge horizon again


def sink_group(store: str) -> str:
    """The Kafka consumer group of a store's sink."""
    return f"knowton-sink-{store}"


NOT_A_MEMBER = (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS)


class GroupMembershipError(RuntimeError):
    """The consumer group refused a commit: the partitions belong to another member now."""


class StoreUnavailableError(RuntimeError):
    """A store stayed unavailable past the retry budget; nothing was committed or dead-lettered."""


@dataclass
class ApplyStats:
    events: int = 0
    tombstones: int = 0
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    stale: int = 0
    dead_lettered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    retries: int = 0
    batches: int = 0
    seconds: float = 0.0
    lag: int = 0
    per_table: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    columnar: int = 0  # of `events`, those read as columns (`debezium.read_change_columns`)

    def summary(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        written = ", ".join(f"{n} written to {store}" for store, n in self.written.items() if n)
        return (
            f"{self.events} events in {self.batches} batches ({rate:,.0f}/s): {written or 'nothing written'}, "
            f"{self.stale} stale writes refused, dead-lettered {self.dead_lettered}, {self.retries} retries, "
            f"lag {self.lag}"
        )

    @classmethod
    def combined(cls, parts: Sequence[ApplyStats]) -> ApplyStats:
        """The stats of several sinks run side by side: counts add up, time and lag are the largest."""
        out = cls()
        for p in parts:
            out.events += p.events
            out.tombstones += p.tombstones
            out.stale += p.stale
            out.retries += p.retries
            out.batches += p.batches
            out.seconds = max(out.seconds, p.seconds)
            out.lag = max(out.lag, p.lag)
            out.columnar += p.columnar
            for store in TARGETS:
                out.written[store] += p.written.get(store, 0)
                out.dead_lettered[store] += p.dead_lettered.get(store, 0)
            for table, n in p.per_table.items():
                out.per_table[table] += n
        return out


@dataclass(frozen=True)
class ApplyConfig:
    bootstrap: str
    group_id: str | None = None  # None: the store's own group, `sink_group(store)`
    topics: tuple[str, ...] = tuple(t.topic for t in CDC_TABLES)
    batch_size: int | None = None  # None: the store's own (`TargetStore.batch_size`)
    max_retry_seconds: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 15.0


TRANSIENT_ERRORS = (TransientStoreError, dlq.DlqPublishError, psycopg.OperationalError, KafkaException)


def retry_transient(
    action: Callable[[], None],
    *,
    budget_seconds: float,
    initial: float = 0.5,
    maximum: float = 15.0,
    on_retry: Callable[[BaseException], None] | None = None,
    what: str = "batch",
    stop: threading.Event | None = None,
) -> None:
    """Run `action` until it succeeds, backing off exponentially while a store is unavailable.

    Past the budget, or when `stop` is set while waiting, StoreUnavailableError: the caller has committed nothing,
    so nothing is lost.
    """
    started = time.monotonic()
    delay = initial
    while True:
        try:
            action()
            return
        except TRANSIENT_ERRORS as exc:
            elapsed = time.monotonic() - started
            if elapsed > budget_seconds:
                raise StoreUnavailableError(
                    f"gave up after {elapsed:.0f} s of retries, nothing committed or dead-lettered: {exc}"
                ) from exc
            if on_retry:
                on_retry(exc)
            log.warning("%s not applied (%s); retrying in %.1f s", what, exc, delay)
            if stop is not None and stop.wait(delay):
                raise StoreUnavailableError(
                    f"stopped while retrying, nothing committed or dead-lettered: {exc}"
                ) from exc
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, maximum)


class CdcSink:
    """The sink of one target store: consumes the cdc-* topics in the store's own consumer group and writes only
    that store. It opens no other store, so a sink of Elasticsearch never waits for ClickHouse, or the reverse."""

    def __init__(
        self,
        config: ApplyConfig,
        *,
        store: str,
        client: Any,
        pg_conninfo: Mapping[str, Any],
        on_progress: Callable[[ApplyStats], None] | None = None,
        tick_seconds: float | None = None,
        writer: Writer | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ):
        """`writer` replaces the store's own (a benchmark writes to throwaway tables); `on_retry` hears of each
        failed attempt while a store is out (a service reports it)."""
        self.config = config
        self.on_retry = on_retry
        self._stop: threading.Event | None = None
        self._subscribed = False
        self.tick_seconds = tick_seconds  # a long-running sink reports progress at least this often, even idle
        self.store: TargetStore = TARGETS[store]
        self.client = client
        self.group_id = config.group_id or sink_group(store)
        self.writer = writer or self.store.writer(client)
        self.batch_size = config.batch_size or self.store.batch_size
        self.pg_conninfo = dict(pg_conninfo)
        self.on_progress = on_progress
        self.producer = dlq.make_producer(config.bootstrap)
        self._pg: psycopg.Connection | None = None
        self._positions: dict[tuple[str, int], int] = {}
        self._horizon = 0  # the tombstone purge horizon, read when a run starts and each minute after
        self._horizon_read = time.monotonic()
        self.assignment: list[tuple[str, int]] = []  # the partitions this sink holds now
        self._inflight: _InFlight | None = None  # the batch being sent on the second thread

    # --- plumbing --------------------------------------------------------------------------
    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.config.bootstrap,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # A member stuck longer than this in a store outage leaves the group (its commit is then refused and
                # it joins again), so it never holds the others' rebalance for longer.
                "max.poll.interval.ms": 300_000,
                "session.timeout.ms": 10_000,  # a sink that died hands its partitions over within seconds
                "heartbeat.interval.ms": 2_000,
                "fetch.wait.max.ms": 100,  # a change is fetched within a tenth of a second of its arrival
                # A backlog comes in large fetches (the default takes 1 MB of a partition per round trip).
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                # When the prefetch queue is full, fetch again as soon as it has room, not a second later.
                "fetch.queue.backoff.ms": 10,
                "topic.metadata.refresh.interval.ms": 30_000,  # partitions added to a topic are taken up soon
            }
        )

    def _pg_conn(self) -> psycopg.Connection:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(**self.pg_conninfo)  # type: ignore[arg-type]
        return self._pg

    # --- the loop --------------------------------------------------------------------------
    def run(
        self, *, until_caught_up: bool = True, max_seconds: float | None = None, stop: threading.Event | None = None
    ) -> ApplyStats:
        stats = ApplyStats()
        t0 = time.monotonic()
        self._stop = stop
        self._subscribed = not until_caught_up
        self._retry(self.check_source_position, stats, what="the check of the stores' newest versions", stop=stop)
        consumer = self._consumer()
        assigned = threading.Event()
        targets: dict[tuple[str, int], int] = {}
        firsts: dict[tuple[str, int], int] = {}
        if until_caught_up:
            # A run that stops when caught up takes its partitions directly from the group's committed
            # offsets: no rebalance to wait for. A long-running sink joins the group instead, and shares the
            # partitions with the group's other members.
            starts = self._starting_positions(consumer, self._partitions(consumer))
            consumer.assign(starts)
            # Caught up means: past every record that was there when the run started. Changes that keep arriving
            # are the next run's, so a run under a steady write load still ends and yields what it holds (the
            # embedded ClickHouse engine, a pool slot).
            targets, firsts = self._ends_at_start(consumer, starts)
            assigned.set()
        else:

            def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
                c.assign(self._starting_positions(c, parts))
                self.assignment = sorted((tp.topic, tp.partition) for tp in parts)
                log.info("%s: assigned %d partition(s)", self.group_id, len(parts))
                assigned.set()

            def on_revoke(c: Consumer, parts: list[TopicPartition]) -> None:
                # The batch being sent is finished and committed while the partitions are still this member's.
                if self._inflight is not None:
                    inflight, self._inflight = self._inflight, None
                    self._complete(c, inflight, stats)
                for tp in parts:
                    self._positions.pop((tp.topic, tp.partition), None)
                self.assignment = []

            self._partitions(consumer)  # a topic still missing (schema not applied): fail now, retried by the caller
            consumer.subscribe(list(self.config.topics), on_assign=on_assign, on_revoke=on_revoke)
        reported = time.monotonic()
        # One batch is sent to the store on a second thread while the next one is consumed, decoded and
        # transformed here (the store's I/O releases the GIL); it is finished, and committed, before the next is sent.
        sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.group_id}-send")
        self._inflight = None
        try:
            while not (stop and stop.is_set()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                want = self.batch_size
                if until_caught_up:
                    # Never more than is left to the ends: the last batch is not kept waiting to fill up.
                    want = min(want, _left_to_read(consumer, targets, firsts))
                    if not want and self._inflight is None:
                        break  # everything up to the ends is written and committed
                msgs = consumer.consume(num_messages=want, timeout=0.1 if self._inflight else 0.5) if want else []
                msgs = [m for m in msgs if not _is_eof_or_error(m)]
                batch = self._prepare_with_retry(msgs, stats) if msgs else None
                if self._inflight is not None:
                    inflight, self._inflight = self._inflight, None
                    self._complete(consumer, inflight, stats)
                    stats.seconds = time.monotonic() - t0
                    stats.lag = consumer_lag(consumer, self._positions)
                    if self.on_progress:
                        self.on_progress(stats)
                    reported = time.monotonic()
                    if until_caught_up and all(self._positions.get(k, -1) >= end for k, end in targets.items()):
                        break  # a batch prepared past the ends is not sent: the next run has it
                if batch is not None:
                    self._inflight = _InFlight(batch, sender.submit(self.writer.send, batch.prepared))
                    continue
                if until_caught_up and assigned.is_set():
                    stats.lag = consumer_lag(consumer, self._positions)
                    if stats.lag == 0:
                        break
                elif self.tick_seconds is not None and time.monotonic() - reported >= self.tick_seconds:
                    stats.seconds = time.monotonic() - t0
                    stats.lag = consumer_lag(consumer, self._positions) if assigned.is_set() else stats.lag
                    if self.on_progress:
                        self.on_progress(stats)
                    reported = time.monotonic()
            if self._inflight is not None:  # stopped: what was sent is finished and committed, or redelivered
                inflight, self._inflight = self._inflight, None
                self._complete(consumer, inflight, stats)
        finally:
            if self._inflight is not None:
                self._inflight.sending.cancel()
                wait([self._inflight.sending])  # nothing of this run writes after it returns
                self._inflight = None
            sender.shutdown(wait=True)
            stats.seconds = time.monotonic() - t0
            consumer.close()
            if self._pg is not None:
                self._pg.close()
        return stats

    def check_source_position(self) -> None:
        """Refuse to start when the store holds versions beyond the source's WAL (a restored source)."""
        conn = self._pg_conn()
        try:
            source = source_position(conn)
            self._horizon = purge_horizon(conn)
            self._horizon_read = time.monotonic()
            check_source_not_behind(source, {"the tombstone purge (ops.purges)": {"horizon": self._horizon}})
        finally:
            conn.rollback()
        try:
            newest = {self.store.name: self.store.newest_versions(self.client)}
        except (ApiError, elastic_transport.TransportError, ch_errors.Error, OSError) as exc:
            # A store that cannot answer is an outage to wait out, like a write it refuses.
            raise TransientStoreError(f"reading the newest versions failed: {type(exc).__name__}: {exc}") from exc
        check_source_not_behind(source, newest)

    def _ends_at_start(
        self, consumer: Consumer, starts: list[TopicPartition]
    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """The end of each partition that holds records past where this run starts, and where it starts."""
        targets, firsts = {}, {}
        for tp in starts:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            start = tp.offset if tp.offset >= 0 else low
            if high > start:
                targets[(tp.topic, tp.partition)] = high
                firsts[(tp.topic, tp.partition)] = start
        return targets, firsts

    def _partitions(self, consumer: Consumer) -> list[TopicPartition]:
        meta = consumer.list_topics(timeout=10).topics
        missing = [t for t in self.config.topics if t not in meta or meta[t].error is not None]
        if missing:
            raise StoreUnavailableError(f"topic(s) {', '.join(missing)} do not exist; run `knowton schema apply`")
        return [TopicPartition(t, p) for t in self.config.topics for p in meta[t].partitions]

    def _starting_positions(self, consumer: Consumer, parts: list[TopicPartition]) -> list[TopicPartition]:
        """Where to start each partition: the group's committed offset; for a partition the group has never
        committed, where the shared group of earlier releases (`LEGACY_GROUP`) got to, so an upgrade does not
        apply the whole topic again; else the beginning."""
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(parts, timeout=10)}
        fresh = [tp for tp in parts if committed.get((tp.topic, tp.partition), -1) < 0]
        if fresh and self.group_id == sink_group(self.store.name):
            legacy = Consumer({"bootstrap.servers": self.config.bootstrap, "group.id": LEGACY_GROUP})
            try:
                adopted = [
                    tp
                    for tp in legacy.committed([TopicPartition(t.topic, t.partition) for t in fresh], timeout=10)
                    if tp.offset >= 0
                ]
            finally:
                legacy.close()
            if adopted:
                # Committed at once, so the lag checks count from there and the former group is read only once.
                try:
                    consumer.commit(
                        offsets=[TopicPartition(t.topic, t.partition, t.offset) for t in adopted], asynchronous=False
                    )
                except KafkaException as exc:
                    log.warning(
                        "%s: could not commit the positions taken from %s: %s", self.group_id, LEGACY_GROUP, exc
                    )
                committed.update({(tp.topic, tp.partition): tp.offset for tp in adopted})
        self._positions.update({k: o for k, o in committed.items() if o >= 0})
        starts = [(tp.topic, tp.partition, committed.get((tp.topic, tp.partition), -1)) for tp in parts]
        return [TopicPartition(t, p, o if o >= 0 else OFFSET_BEGINNING) for t, p, o in starts]

    def _read_horizon(self) -> None:
        if time.monotonic() - self._horizon_read > HORIZON_READ_SECONDS:
            # A sink that runs for days sees the purges made while it runs.
            conn = self._pg_conn()
            self._horizon = purge_horizon(conn)
            conn.rollback()
            self._horizon_read = time.monotonic()

    def _prepare_with_retry(self, msgs: list[Message], stats: ApplyStats) -> _Batch:
        prepared: list[_Batch] = []

        def attempt() -> None:
            self._read_horizon()
            prepared.append(self.prepare_batch(msgs))

        self._retry(attempt, stats, what=f"batch of {len(msgs)} records", stop=self._stop)
        return prepared[-1]

    def _complete(self, consumer: Consumer, inflight: _InFlight, stats: ApplyStats) -> None:
        """Finish a batch sent on the second thread and commit it; a failed send is applied again here, whole and
        with the usual retries (writes are idempotent)."""
        try:
            outcome = inflight.sending.result()
        except TRANSIENT_ERRORS as exc:
            self._retrying(exc, stats)
            log.warning("batch of %d records not applied (%s); retrying", len(inflight.batch.msgs), exc)
            self._apply_with_retry(consumer, inflight.batch.msgs, stats)
            return
        self.finish_batch(inflight.batch, outcome, stats)
        self._commit_with_retry(consumer, inflight.batch.msgs, stats)

    def _commit_with_retry(self, consumer: Consumer, msgs: list[Message], stats: ApplyStats) -> None:
        self._retry(
            lambda: self._commit(consumer, msgs, stats), stats, what=f"commit of {len(msgs)} records", stop=self._stop
        )

    def _apply_with_retry(self, consumer: Consumer, msgs: list[Message], stats: ApplyStats) -> None:
        def attempt() -> None:
            self._read_horizon()
            self.apply_batch(msgs, stats)
            self._commit(consumer, msgs, stats)

        self._retry(attempt, stats, what=f"batch of {len(msgs)} records", stop=self._stop)

    def _commit(self, consumer: Consumer, msgs: list[Message], stats: ApplyStats) -> None:
        """Commit a batch that is written; a group that moved its partitions meanwhile is told apart."""
        try:
            self._positions.update(commit(consumer, msgs))
        except KafkaException as exc:
            if exc.args[0].code() not in NOT_A_MEMBER:
                raise
            if self._subscribed and exc.args[0].code() == KafkaError.REBALANCE_IN_PROGRESS:
                # The group is moving partitions: this batch is written (idempotent) and will be delivered
                # again to whoever owns it next; the next poll takes part in the rebalance.
                log.info("%s: commit skipped during a rebalance", self.group_id)
                return
            # Retrying cannot help: the batch is written (idempotent) and whoever owns the partitions now
            # applies it again.
            raise GroupMembershipError(
                f"{self.group_id} did not take this sink's commit ({exc.args[0].str()}): another member owns its "
                "partitions (a running sink service, or a rebalance). A run that stops when caught up cannot "
                "commit beside a running sink of the same store; a running sink joins the group again."
            ) from exc
        stats.batches += 1

    def _retry(self, action: Callable[[], None], stats: ApplyStats, *, what: str, stop: threading.Event | None) -> None:
        retry_transient(
            action,
            budget_seconds=self.config.max_retry_seconds,
            initial=self.config.backoff_initial,
            maximum=self.config.backoff_max,
            on_retry=lambda exc: self._retrying(exc, stats),
            what=what,
            stop=stop,
        )

    def _retrying(self, exc: BaseException, stats: ApplyStats) -> None:
        stats.retries += 1
        if self._pg is not None and isinstance(exc, psycopg.OperationalError):
            self._pg.close()
        if self.on_retry:
            self.on_retry(exc)

    # --- one batch -------------------------------------------------------------------------
    def apply_batch(self, msgs: Sequence[Message], stats: ApplyStats) -> None:
        """Write one batch to the store and dead-letter its poison records. Idempotent."""
        batch = self.prepare_batch(msgs)
        self.finish_batch(batch, self.writer.send(batch.prepared), stats)

    def prepare_batch(self, msgs: Sequence[Message]) -> _Batch:
        """Decode and transform a batch, ready to send: reads PostgreSQL (truncates, enrichment), writes no store."""
        columns, tombstones, one_by_one = self._read_as_columns(msgs) if self.writer.takes_columns else ([], 0, msgs)
        events: list[tuple[ChangeEvent, Message]] = []
        letters: list[dlq.DeadLetter] = []
        for msg in one_by_one:
            try:
                event = decode_event(msg.topic(), msg.key(), msg.value())
            except (MalformedEventError, UnknownTableError) as exc:
                letters.append(dlq.DeadLetter.from_failure(self.store.name, msg, exc))
                continue
            if event is None:
                tombstones += 1
                continue
            # A change older than the purge horizon could resurrect a purged delete: the sink is further behind
            # than the retention window, which is for a rebuild to fix, not for this batch to guess.
            check_not_below_horizon(event.version, self._horizon, f"a change of {event.table.name} in {msg.topic()}")
            events.append((event, msg))

        truncated = truncate_horizons(self._pg_conn(), [e for e, _ in events if e.is_truncate])
        items = [below_truncate(item, truncated) for item in target_items(self.store, events, self._pg_conn)]
        prepared = self.writer.prepare(items)
        for changes, group in columns:
            self.writer.prepare_columns(  # type: ignore[attr-defined]
                prepared,
                changes,
                tombstones_below=truncated.get(changes.table.name, 0),
                items=lambda group=group: [  # type: ignore[misc]
                    below_truncate(item, truncated) for item in mirror_items(_decoded(group))
                ],
            )
        counted = [(changes.table.name, len(changes)) for changes, _ in columns]
        return _Batch(list(msgs), events, letters, tombstones, prepared, counted)

    def _read_as_columns(
        self, msgs: Sequence[Message]
    ) -> tuple[list[tuple[ChangeColumns, list[Message]]], int, list[Message]]:
        """The batch's records of each table, read as columns where they are all usual changes (a mirror writes them
        as they are); the tombstones among those; and the records to decode one by one, in their order."""
        by_topic: dict[str, list[Message]] = defaultdict(list)
        for msg in msgs:
            by_topic[msg.topic()].append(msg)
        columns: list[tuple[ChangeColumns, list[Message]]] = []
        tombstones = 0
        one_by_one: list[Message] = []
        for topic, group in by_topic.items():
            changes = None
            try:
                table = table_for_topic(topic)
            except UnknownTableError:
                table = None
            if table is not None and self.store.holds(table):
                values = list(map(Message.value, group))
                keys = list(map(Message.key, group))
                if None in values:  # tombstones: nothing to write for them
                    keys = [k for k, v in zip(keys, values, strict=True) if v is not None]
                    values = [v for v in values if v is not None]
                changes = read_change_columns(table, keys, values)
            if changes is None:
                one_by_one += group
                continue
            # A change older than the purge horizon could resurrect a purged delete (see `prepare_batch`).
            check_not_below_horizon(
                min(changes.versions), self._horizon, f"a change of {changes.table.name} in {topic}"
            )
            tombstones += len(group) - len(changes)
            columns.append((changes, group))
        return columns, tombstones, one_by_one

    def finish_batch(self, batch: _Batch, outcome: WriteOutcome, stats: ApplyStats) -> None:
        """After the batch's writes: its truncates, its dead letters, its counts."""
        letters = batch.letters + _letters(self.store.name, outcome)
        # A truncate turns what the store holds of the table below its version into tombstones, after the
        # batch's other writes: changes after the truncate carry higher versions and stay.
        for e, _ in batch.events:
            if e.is_truncate and self.store.holds(e.table):
                outcome.written += self.writer.truncate(e.table, e.version)

        dlq.publish(self.producer, letters)
        # Counted only once the batch has fully succeeded (a retried batch is not counted twice).
        stats.columnar += sum(n for _, n in batch.counted)
        stats.events += len(batch.events) + sum(n for _, n in batch.counted)
        stats.tombstones += batch.tombstones
        stats.written[self.store.name] += outcome.written
        stats.stale += outcome.stale
        for letter in letters:
            stats.dead_lettered[letter.target] += 1
        for e, _ in batch.events:
            stats.per_table[e.table.name] += 1
        for name, n in batch.counted:
            stats.per_table[name] += n


@dataclass(frozen=True)
class _Batch:
    """A batch decoded and transformed, ready for the store."""

    msgs: list[Message]
    events: list[tuple[ChangeEvent, Message]]
    letters: list[dlq.DeadLetter]  # records that failed to decode
    tombstones: int
    prepared: Prepared
    counted: list[tuple[str, int]] = field(default_factory=list)  # changes read as columns: (table, how many)


@dataclass(frozen=True)
class _InFlight:
    batch: _Batch
    sending: Future[WriteOutcome]


def truncate_horizons(conn: psycopg.Connection, truncates: Sequence[ChangeEvent]) -> dict[str, int]:
    """Record the batch's truncates (before anything is written for them), then return the newest truncate version
    of every table: what a change below it must not bring back."""
    for e in truncates:
        conn.execute(
            "INSERT INTO ops.truncates (table_name, version) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (e.table.name, e.version),
        )
    rows = conn.execute("SELECT table_name, max(version) FROM ops.truncates GROUP BY table_name").fetchall()
    conn.commit()
    return {name: int(version) for name, version in rows}


def below_truncate(item: WriteItem, truncated: Mapping[str, int]) -> WriteItem:
    """A live row versioned below its table's newest truncate was emptied by it: a tombstone at its own version."""
    if not item.deleted and item.version < truncated.get(item.table.name, 0):
        return dataclasses.replace(item, deleted=True)
    return item


class SideBySide:
    """Several stores' sinks run at once, each in its own thread with its own group, as `knowton sink run` does
    when given more than one store: one store's outage holds back only its own sink."""

    def __init__(self, sinks: Sequence[CdcSink]):
        self.sinks = list(sinks)

    @classmethod
    def of(
        cls,
        config: ApplyConfig,
        clients: Mapping[str, Any],
        pg_conninfo: Mapping[str, Any],
        on_progress: Callable[[ApplyStats], None] | None = None,
    ) -> SideBySide:
        return cls(
            [
                CdcSink(config, store=name, client=client, pg_conninfo=pg_conninfo, on_progress=on_progress)
                for name, client in clients.items()
            ]
        )

    def run(self, *, stop: threading.Event | None = None, **run_args: Any) -> ApplyStats:
        """Run every sink to the end (see `CdcSink.run`); the first error any raised is raised after all stop. When
        the caller is interrupted (a run stopped from Dagster), the sinks are stopped before it returns."""
        results: dict[int, ApplyStats] = {}
        errors: list[BaseException] = []
        halt = stop or threading.Event()

        def one(i: int, sink: CdcSink) -> None:
            try:
                results[i] = sink.run(stop=halt, **run_args)
            except BaseException as exc:  # re-raised below, once every sink has stopped
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i, s), name=s.group_id) for i, s in enumerate(self.sinks)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        finally:
            if any(t.is_alive() for t in threads):
                halt.set()
                for t in threads:
                    t.join()
        if errors:
            raise errors[0]
        return ApplyStats.combined([results[i] for i in sorted(results)])


class SinkTurns:
    """Turns for a store's sink inside a long job that holds the store (a backfill holds the embedded ClickHouse
    engine for as long as it runs): called between the job's chunks, it runs the sink until caught up at most
    every `every` seconds, so the store stays fresh while the job runs instead of waiting for its end."""

    def __init__(self, sink: CdcSink, *, every: float = 30.0, budget: float = 20.0):
        self.sink, self.every, self.budget = sink, every, budget
        self.last = time.monotonic()
        self.turns = 0
        self.failed = 0
        self.events = 0

    def __call__(self, *_: object) -> None:
        if time.monotonic() - self.last < self.every:
            return
        try:
            stats = self.sink.run(until_caught_up=True, max_seconds=self.budget)
        except Exception as exc:  # a missed turn loses nothing: the changes wait in Kafka for the next one
            log.warning(
                "the %s sink's turn failed (%s: %s); the job goes on", self.sink.store.name, type(exc).__name__, exc
            )
            self.failed += 1
        else:
            self.turns += 1
            self.events += stats.events
        self.last = time.monotonic()


def latest_per_key(events: Sequence[tuple[ChangeEvent, Any]]) -> list[tuple[ChangeEvent, tuple[Any, ...]]]:
    """The last change of each row in the batch, with the sources of all its changes (in order).

    Changes of one row that share a version (one transaction) must be written in order; keeping only the last
    makes that hold in a single insert too (`lib/versions.py`). Truncates carry no row and are left out."""
    latest: dict[tuple[str, tuple[Any, ...]], tuple[ChangeEvent, list[Any]]] = {}
    for e, source in events:
        if e.is_truncate:
            continue
        ident = (e.table.name, e.key)
        previous = latest.pop(ident, None)
        sources = previous[1] if previous else []
        sources.append(source)
        keep = e if previous is None or e.version >= previous[0].version else previous[0]
        latest[ident] = (keep, sources)
    return [(e, tuple(sources)) for e, sources in latest.values()]


def target_items(
    store: TargetStore, events: Sequence[tuple[ChangeEvent, Any]], pg_conn: Callable[[], psycopg.Connection]
) -> list[WriteItem]:
    """What `store` must write for a batch of changes: a mirror takes each row as its change brings it; a search
    document also shows fields derived from other tables, so it is re-read (see `changed_documents`)."""
    if store.shape == "document":
        return changed_documents(events, pg_conn, store.holds)
    return mirror_items([(e, source) for e, source in events if store.holds(e.table)])


def mirror_items(events: Sequence[tuple[ChangeEvent, Any]]) -> list[WriteItem]:
    """Mirror rows straight from the events, each versioned by commit order (`lib/versions.py`)."""
    return [WriteItem(e.table, e.row, e.version, e.is_delete, sources) for e, sources in latest_per_key(events)]


def _affects(e: ChangeEvent, dependency: Dependency) -> bool:
    if e.is_truncate or e.op in ("c", "d", "r") or not dependency.watch:
        return True
    before, after = e.before or {}, e.after or {}
    # A column the old image does not hold (REPLICA IDENTITY DEFAULT, a value that did not decode) may have changed.
    return any(c not in before or before[c] != after.get(c) for c in (*dependency.watch, dependency.column))


def changed_documents(
    events: Sequence[tuple[ChangeEvent, Any]],
    pg_conn: Callable[[], psycopg.Connection],
    holds: Callable[[SyncedTable], bool],
) -> list[WriteItem]:
    """The documents of the tables a store `holds`, for a batch of changes. A document without derived fields comes from its event; one with
    derived fields is re-read from PostgreSQL, in a consistent snapshot that versions it, whenever anything it
    shows changed: its own row, or a row of a table it depends on, followed as the catalog declares
    (`SyncedTable.dependencies`). A truncate of such a table changes every document that depends on it.
    `source` is what to dead-letter if an item turns out poison."""
    items: list[WriteItem] = []
    reread: dict[str, dict[Any, list[Any]]] = defaultdict(lambda: defaultdict(list))  # table -> key -> sources
    every: dict[str, list[Any]] = defaultdict(list)  # table -> sources of truncates that touch all its documents
    linked: dict[tuple[str, Dependency], dict[Any, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for e, source in events:
        if holds(e.table) and e.table.derived and not e.is_truncate:
            reread[e.table.name][e.key[0]].append(source)
        for documents, dependency in documents_fed_by(e.table.name):
            if not holds(documents) or not _affects(e, dependency):
                continue
            if e.is_truncate:
                every[documents.name].append(source)
                continue
            for image in (e.before, e.after):
                if image and dependency.column in image:
                    linked[(documents.name, dependency)][image[dependency.column]].append(source)
    for e, sources in latest_per_key(events):
        if holds(e.table) and not e.table.derived:
            items.append(WriteItem(e.table, e.row, e.version, e.is_delete, sources))
    if not reread and not every and not linked:
        return items
    conn = pg_conn()
    for name, sources in every.items():
        for key in all_keys(conn, catalog_table(name)):
            reread[name][key].extend(sources)
    for (name, dependency), by_value in linked.items():
        documents = catalog_table(name)
        if dependency.row_column in documents.key:
            for value, sources in by_value.items():
                reread[name][value].extend(sources)
            continue
        for key, value in linked_keys(conn, documents, dependency.row_column, list(by_value)):
            reread[name][key].extend(by_value[value])
    conn.commit()
    if not reread:  # the linked rows feed no document that exists
        return items
    with consistent_snapshot(conn) as version:
        for name, by_key in reread.items():
            items += document_items(
                conn, catalog_table(name), by_key, version=version, sources={k: tuple(v) for k, v in by_key.items()}
            )
    return items


def _decoded(msgs: Sequence[Message]) -> list[tuple[ChangeEvent, Message]]:
    """Records already read as columns, decoded one by one (`read_change_columns` took them: none is refused)."""
    events = []
    for m in msgs:
        event = decode_event(m.topic(), m.key(), m.value())
        if event is not None:
            events.append((event, m))
    return events


def _letters(target: str, outcome: WriteOutcome) -> list[dlq.DeadLetter]:
    letters = []
    for item, exc in outcome.poison:
        letters += [dlq.DeadLetter.from_failure(target, m, exc) for m in item.sources]
    return letters


def _left_to_read(
    consumer: Consumer, ends: Mapping[tuple[str, int], int], firsts: Mapping[tuple[str, int], int]
) -> int:
    """Records between what `consumer` has consumed (its positions, no broker round trip) and `ends`."""
    if not ends:
        return 0
    left = 0
    for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
        key = (tp.topic, tp.partition)
        left += max(0, ends[key] - (tp.offset if tp.offset >= 0 else firsts[key]))
    return left


def _is_eof_or_error(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    log.warning("consumer error: %s", err)
    return True


COMMITTED_TS = "ts="  # commit metadata: the Kafka timestamp (ms) of the last record applied


def commit(consumer: Consumer, msgs: Sequence[Message]) -> dict[tuple[str, int], int]:
    """Commit, synchronously, the offset after the last record of each partition; returns those offsets.

    Each offset carries the timestamp of the record before it as metadata, so how far the apply has got in
    time is one committed-offset read away (end-to-end lag without fetching a record)."""
    records = []
    seen = set()
    for m in reversed(msgs):  # a partition's records come in offset order: its last one is its highest
        partition = (m.topic(), m.partition())
        if partition in seen:
            continue
        seen.add(partition)
        kind, ms = m.timestamp()
        records.append((*partition, m.offset(), ms if kind != TIMESTAMP_NOT_AVAILABLE else -1))
    offsets = offsets_to_commit(records)
    consumer.commit(offsets=offsets, asynchronous=False)
    return {(tp.topic, tp.partition): tp.offset for tp in offsets}


def offsets_to_commit(records: Sequence[tuple[str, int, int, int]]) -> list[TopicPartition]:
    """Per partition, the offset after its highest record (topic, partition, offset, timestamp ms or -1),
    with that record's timestamp as metadata when it has one."""
    last: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, offset, ms in records:
        key = (topic, partition)
        if key not in last or offset >= last[key][0]:
            last[key] = (offset, ms)
    return [
        TopicPartition(t, p, o + 1, metadata=f"{COMMITTED_TS}{ms}") if ms >= 0 else TopicPartition(t, p, o + 1)
        for (t, p), (o, ms) in last.items()
    ]


def committed_timestamp(tp: TopicPartition) -> datetime | None:
    """The timestamp `commit` stored with a committed offset; None for offsets committed without one."""
    metadata = tp.metadata or ""
    if not metadata.startswith(COMMITTED_TS):
        return None
    try:
        ms = int(metadata.removeprefix(COMMITTED_TS))
        return datetime.fromtimestamp(ms / 1000, UTC) if ms >= 0 else None
    except (ValueError, OverflowError, OSError):  # not written by `commit`: fetch the record instead
        return None


def consumer_lag(consumer: Consumer, positions: Mapping[tuple[str, int], int]) -> int:
    """Records between `positions` (the next offset to apply, per partition) and the partitions' ends.

    Positions are tracked by the applier itself: asking the broker for committed offsets partition by
    partition costs a round trip each, which made every idle check take seconds.
    """
    total = 0
    for tp in consumer.assignment():
        # Fetch responses keep the cached watermarks current; an uncached query queues behind the
        # consumer's long-poll fetch and costs up to fetch.wait.max.ms per partition.
        low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
        pos = positions.get((tp.topic, tp.partition), low)
        total += max(0, high - max(pos, low))
    return total


def group_lag(bootstrap: str, group_id: str, topics: Sequence[str] | None = None) -> dict[str, int]:
    """Per-topic lag of a consumer group from its committed offsets (cheap: for sensors)."""
    topics = list(topics or [t.topic for t in CDC_TABLES])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(timeout=5).topics
        parts = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]
        committed = consumer.committed(parts, timeout=5) if parts else []
        lag: dict[str, int] = defaultdict(int)
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            pos = tp.offset if tp.offset >= 0 else low
            lag[tp.topic] += max(0, high - pos)
        return dict(lag)
    finally:
        consumer.close()
