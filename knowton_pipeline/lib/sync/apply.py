"""CDC apply: consume the cdc-* topics, write ClickHouse and Elasticsearch in batches, then commit.

At-least-once and nothing lost (DESIGN.md principle 4): offsets are committed only after every
record of a batch is written or durably dead-lettered; a store that is down is retried with backoff
and never dead-letters anything; only records that can never be applied go to the DLQ.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import elastic_transport
import psycopg
from clickhouse_connect.driver import exceptions as ch_errors
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, Message, TopicPartition
from elasticsearch import ApiError, Elasticsearch
from psycopg import sql

from knowton_pipeline.catalog import CDC_TABLES, UnknownTableError
from knowton_pipeline.lib.debezium import ChangeEvent, MalformedEventError, decode_event
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.positions import (
    check_source_not_behind,
    clickhouse_newest_versions,
    elasticsearch_newest_versions,
    source_position,
)
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import CONTENT, content_items, contents_by_creators, qualified
from knowton_pipeline.lib.sync.writers import (
    ClickHouseWriter,
    ElasticsearchWriter,
    TransientStoreError,
    WriteItem,
    WriteOutcome,
)

log = logging.getLogger(__name__)

DEFAULT_GROUP = "knowton-sync"
TARGETS = ("clickhouse", "elasticsearch")


class StoreUnavailableError(RuntimeError):
    """A store stayed unavailable past the retry budget; nothing was committed or dead-lettered."""


@dataclass
class ApplyStats:
    events: int = 0
    tombstones: int = 0
    clickhouse_rows: int = 0
    elasticsearch_docs: int = 0
    stale: int = 0
    dead_lettered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    retries: int = 0
    batches: int = 0
    seconds: float = 0.0
    lag: int = 0
    per_table: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def summary(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        return (
            f"{self.events} events in {self.batches} batches ({rate:,.0f}/s): {self.clickhouse_rows} ClickHouse rows, "
            f"{self.elasticsearch_docs} Elasticsearch documents, {self.stale} stale writes refused, "
            f"dead-lettered {self.dead_lettered}, {self.retries} retries, lag {self.lag}"
        )


@dataclass(frozen=True)
class ApplyConfig:
    bootstrap: str
    group_id: str = DEFAULT_GROUP
    topics: tuple[str, ...] = tuple(t.topic for t in CDC_TABLES)
    batch_size: int = 2000
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
) -> None:
    """Run `action` until it succeeds, backing off exponentially while a store is unavailable.

    Past the budget, StoreUnavailableError: the caller has committed nothing, so nothing is lost.
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
            time.sleep(delay)
            delay = min(delay * 2, maximum)


class CdcApplier:
    def __init__(
        self,
        config: ApplyConfig,
        *,
        clickhouse: ClickHouseClient,
        es: Elasticsearch,
        pg_conninfo: Mapping[str, Any],
        on_progress: Callable[[ApplyStats], None] | None = None,
    ):
        self.config = config
        self.ch_writer = ClickHouseWriter(clickhouse)
        self.es_writer = ElasticsearchWriter(es)
        self.pg_conninfo = dict(pg_conninfo)
        self.on_progress = on_progress
        self.producer = dlq.make_producer(config.bootstrap)
        self._pg: psycopg.Connection | None = None
        self._positions: dict[tuple[str, int], int] = {}

    # --- plumbing --------------------------------------------------------------------------
    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.config.bootstrap,
                "group.id": self.config.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "max.poll.interval.ms": 1_800_000,  # a batch may wait out a store outage
                "session.timeout.ms": 45_000,
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
        retry_transient(
            self.check_source_position,
            budget_seconds=self.config.max_retry_seconds,
            initial=self.config.backoff_initial,
            maximum=self.config.backoff_max,
            on_retry=lambda _exc: setattr(stats, "retries", stats.retries + 1),
            what="the check of the stores' newest versions",
        )
        consumer = self._consumer()
        assigned = threading.Event()
        if until_caught_up:
            # A run that stops when caught up takes its partitions directly from the group's committed
            # offsets: no rebalance to wait for. A long-running worker joins the group instead.
            consumer.assign(self._committed_positions(consumer))
            assigned.set()
        else:

            def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
                committed = c.committed(parts, timeout=10)
                self._positions.update({(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0})
                assigned.set()

            consumer.subscribe(list(self.config.topics), on_assign=on_assign)
        try:
            while not (stop and stop.is_set()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                msgs = consumer.consume(num_messages=self.config.batch_size, timeout=0.5)
                msgs = [m for m in msgs if not _is_eof_or_error(m)]
                if msgs:
                    self._apply_with_retry(consumer, msgs, stats)
                    stats.seconds = time.monotonic() - t0
                    stats.lag = consumer_lag(consumer, self._positions)
                    if self.on_progress:
                        self.on_progress(stats)
                elif until_caught_up and assigned.is_set():
                    stats.lag = consumer_lag(consumer, self._positions)
                    if stats.lag == 0:
                        break
        finally:
            stats.seconds = time.monotonic() - t0
            consumer.close()
            if self._pg is not None:
                self._pg.close()
        return stats

    def check_source_position(self) -> None:
        """Refuse to start when the stores hold versions beyond the source's WAL (a restored source)."""
        conn = self._pg_conn()
        try:
            source = source_position(conn)
        finally:
            conn.rollback()
        try:
            newest = {
                "clickhouse": clickhouse_newest_versions(self.ch_writer.client),
                "elasticsearch": elasticsearch_newest_versions(self.es_writer.es),
            }
        except (ApiError, elastic_transport.TransportError, ch_errors.Error, OSError) as exc:
            # A store that cannot answer is an outage to wait out, like a write it refuses.
            raise TransientStoreError(f"reading the newest versions failed: {type(exc).__name__}: {exc}") from exc
        check_source_not_behind(source, newest)

    def _committed_positions(self, consumer: Consumer) -> list[TopicPartition]:
        meta = consumer.list_topics(timeout=10).topics
        missing = [t for t in self.config.topics if t not in meta or meta[t].error is not None]
        if missing:
            raise StoreUnavailableError(f"topic(s) {', '.join(missing)} do not exist; run `knowton schema apply`")
        parts = [TopicPartition(t, p) for t in self.config.topics for p in meta[t].partitions]
        committed = consumer.committed(parts, timeout=10)
        self._positions.update({(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0})
        return [
            TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in committed
        ]

    def _apply_with_retry(self, consumer: Consumer, msgs: list[Message], stats: ApplyStats) -> None:
        def attempt() -> None:
            self.apply_batch(msgs, stats)
            self._positions.update(commit(consumer, msgs))
            stats.batches += 1

        def on_retry(exc: BaseException) -> None:
            stats.retries += 1
            if self._pg is not None and isinstance(exc, psycopg.OperationalError):
                self._pg.close()

        retry_transient(
            attempt,
            budget_seconds=self.config.max_retry_seconds,
            initial=self.config.backoff_initial,
            maximum=self.config.backoff_max,
            on_retry=on_retry,
            what=f"batch of {len(msgs)} records",
        )

    # --- one batch -------------------------------------------------------------------------
    def apply_batch(self, msgs: Sequence[Message], stats: ApplyStats) -> None:
        """Write one batch to both targets and dead-letter its poison records. Idempotent."""
        events: list[tuple[ChangeEvent, Message]] = []
        letters: list[dlq.DeadLetter] = []
        for msg in msgs:
            try:
                event = decode_event(msg.topic(), msg.key(), msg.value())
            except (MalformedEventError, UnknownTableError) as exc:
                letters += [dlq.DeadLetter.from_failure(t, msg, exc) for t in TARGETS]
                continue
            if event is None:
                stats.tombstones += 1
                continue
            events.append((event, msg))

        ch_items = clickhouse_items(events)
        ch_out = self.ch_writer.write(ch_items)
        letters += _letters("clickhouse", ch_out)

        es_items = self.elasticsearch_items(events)
        es_out = self.es_writer.write(es_items)
        letters += _letters("elasticsearch", es_out)

        # A truncate turns what the stores hold of the table below its version into tombstones, after the batch's
        # other writes: changes after the truncate carry higher versions and stay.
        for e, _ in events:
            if e.is_truncate:
                ch_out.written += self.ch_writer.truncate(e.table, e.version)
                if e.table.elasticsearch_index is not None:
                    es_out.written += self.es_writer.truncate(e.table, e.version)

        dlq.publish(self.producer, letters)
        # Counted only once the batch has fully succeeded (a retried batch is not counted twice).
        stats.events += len(events)
        stats.clickhouse_rows += ch_out.written
        stats.elasticsearch_docs += es_out.written
        stats.stale += ch_out.stale + es_out.stale
        for letter in letters:
            stats.dead_lettered[letter.target] += 1
        for e, _ in events:
            stats.per_table[e.table.name] += 1

    def elasticsearch_items(self, events: Sequence[tuple[ChangeEvent, Message]]) -> list[WriteItem]:
        return elasticsearch_items(events, self._pg_conn)


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


def clickhouse_items(events: Sequence[tuple[ChangeEvent, Any]]) -> list[WriteItem]:
    """Mirror rows straight from the events, each versioned by commit order (`lib/versions.py`)."""
    return [WriteItem(e.table, e.row, e.version, e.is_delete, sources) for e, sources in latest_per_key(events)]


def elasticsearch_items(
    events: Sequence[tuple[ChangeEvent, Any]], pg_conn: Callable[[], psycopg.Connection]
) -> list[WriteItem]:
    """User documents come from the event; Content documents, which carry the creator's username and
    the sales count, are re-read from PostgreSQL whenever anything they show changed, in a consistent
    snapshot that versions them. A truncate of User or Purchase changes what every Content document shows.
    `source` is what to dead-letter if an item turns out poison."""
    items: list[WriteItem] = []
    content_sources: dict[int, list[Any]] = defaultdict(list)
    creators: dict[str, list[Any]] = defaultdict(list)
    every_content: list[Any] = []
    for e, source in events:
        if e.is_truncate and e.table.name in ("User", "Purchase"):
            every_content.append(source)
        elif e.table.name == "Content" and not e.is_truncate:
            content_sources[e.row["id"]].append(source)
        elif e.table.name == "Purchase":
            # The old image may lack contentId (REPLICA IDENTITY DEFAULT, or a value that did not decode).
            for image in (e.before, e.after):
                if image and "contentId" in image:
                    content_sources[image["contentId"]].append(source)
        elif e.table.name == "User" and e.op == "u" and (e.before or {}).get("username") != e.row["username"]:
            creators[e.row["address"]].append(source)
    for e, sources in latest_per_key(events):
        if e.table.name == "User":
            items.append(WriteItem(e.table, e.row, e.version, e.is_delete, sources))
    if not content_sources and not creators and not every_content:
        return items
    conn = pg_conn()
    if every_content:
        for (content_id,) in conn.execute(sql.SQL("SELECT id FROM {}").format(qualified(CONTENT))):
            content_sources[content_id].extend(every_content)
    for content_id, creator in contents_by_creators(conn, list(creators)):
        content_sources[content_id].extend(creators[creator])
    conn.commit()
    with consistent_snapshot(conn) as version:
        items += content_items(
            conn, content_sources, version=version, sources={k: tuple(v) for k, v in content_sources.items()}
        )
    return items


def _letters(target: str, outcome: WriteOutcome) -> list[dlq.DeadLetter]:
    letters = []
    for item, exc in outcome.poison:
        letters += [dlq.DeadLetter.from_failure(target, m, exc) for m in item.sources]
    return letters


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
    for m in msgs:
        kind, ms = m.timestamp()
        records.append((m.topic(), m.partition(), m.offset(), ms if kind != TIMESTAMP_NOT_AVAILABLE else -1))
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


def group_lag(bootstrap: str, group_id: str = DEFAULT_GROUP, topics: Sequence[str] | None = None) -> dict[str, int]:
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
