"""DLQ replay: re-apply dead letters through the same transform, with counted, backed-off attempts.

Each run reads the DLQ topics up to the end they had when it started. A record that is due is
applied to its target; on success it is done, on failure it goes back to its DLQ with one more
attempt counted, and after the last attempt it is parked (the `dlq-parked` topic and
`ops.dlq_parked`), never dropped. Records written by a Kafka Connect sink's DLQ are read alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer, Message, TopicPartition
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import UnknownTableError
from knowton_pipeline.lib.debezium import MalformedEventError, decode_event
from knowton_pipeline.lib.maintenance import BelowPurgeHorizonError, check_not_below_horizon, purge_horizon
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import below_truncate, retry_transient, target_items, truncate_horizons

log = logging.getLogger(__name__)

REPLAY_GROUP = "knowton-dlq-replay"
TOPIC_TARGET = {topic: target for target, topic in dlq.TARGET_DLQ.items()}


@dataclass(frozen=True)
class ReplayConfig:
    bootstrap: str
    group_id: str = REPLAY_GROUP
    max_attempts: int = 5
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    ignore_backoff: bool = False  # an operator who fixed the cause replays everything now
    max_retry_seconds: float = 300.0


@dataclass
class ReplayStats:
    read: int = 0
    applied: int = 0
    requeued: int = 0  # failed again, back in the DLQ with one more attempt
    not_due: int = 0
    parked: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.read} dead letters read: {self.applied} applied, {self.requeued} failed again, "
            f"{self.not_due} waiting for their backoff, {self.parked} parked"
        )


def due_at_ms(letter: dlq.DeadLetter, config: ReplayConfig) -> int:
    """When the next attempt may run: exponential in the attempts made so far."""
    delay = min(config.backoff_base_seconds * 2 ** max(0, letter.attempts - 1), config.backoff_max_seconds)
    return (letter.last_failure_ms or letter.first_failure_ms) + int(delay * 1000)


class DlqReplayer:
    def __init__(
        self,
        config: ReplayConfig,
        *,
        clickhouse: ClickHouseClient,
        es: Elasticsearch,
        pg_conninfo: Mapping[str, Any],
        on_progress: Callable[[ReplayStats], None] | None = None,
    ):
        self.config = config
        clients: dict[str, Any] = {CLICKHOUSE.name: clickhouse, ELASTICSEARCH.name: es}
        self.writers = {name: TARGETS[name].writer(client) for name, client in clients.items()}
        self.pg_conninfo = dict(pg_conninfo)
        self.on_progress = on_progress
        self.producer = dlq.make_producer(config.bootstrap)
        self._pg: psycopg.Connection | None = None
        self._horizon = 0  # the tombstone purge horizon, read when a run starts

    def _pg_conn(self) -> psycopg.Connection:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(**self.pg_conninfo)  # type: ignore[arg-type]
        return self._pg

    def run(self, *, max_seconds: float | None = None) -> ReplayStats:
        stats = ReplayStats()
        t0 = time.monotonic()
        conn = self._pg_conn()
        self._horizon = purge_horizon(conn)
        conn.rollback()
        consumer = Consumer(
            {
                "bootstrap.servers": self.config.bootstrap,
                "group.id": self.config.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            ends = self._assign(consumer)
            positions = {key: pos for key, (pos, _) in ends.items()}
            while any(positions[k] < end for k, (_, end) in ends.items()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                msgs = [m for m in consumer.consume(num_messages=500, timeout=1.0) if m.error() is None]
                # Records republished by this run sit past the end it started with: leave them for the next.
                msgs = [m for m in msgs if m.offset() < ends[(m.topic(), m.partition())][1]]
                if not msgs:
                    continue
                self._replay_with_retry(msgs, stats)
                after: dict[tuple[str, int], int] = {}
                for m in msgs:
                    after[(m.topic(), m.partition())] = max(after.get((m.topic(), m.partition()), 0), m.offset() + 1)
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in after.items()], asynchronous=False)
                positions.update(after)
                if self.on_progress:
                    self.on_progress(stats)
        finally:
            stats.seconds = time.monotonic() - t0
            consumer.close()
            if self._pg is not None:
                self._pg.close()
        return stats

    def _assign(self, consumer: Consumer) -> dict[tuple[str, int], tuple[int, int]]:
        """Assign every DLQ partition from the group's committed offset; (start, end) per partition."""
        topics = list(TOPIC_TARGET)
        meta = consumer.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]
        committed = consumer.committed(parts, timeout=10)
        bounds: dict[tuple[str, int], tuple[int, int]] = {}
        assignment = []
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            start = max(tp.offset, low) if tp.offset >= 0 else low
            bounds[(tp.topic, tp.partition)] = (start, high)
            assignment.append(TopicPartition(tp.topic, tp.partition, start))
        consumer.assign(assignment)
        return bounds

    def _replay_with_retry(self, msgs: Sequence[Message], stats: ReplayStats) -> None:
        def on_retry(exc: BaseException) -> None:
            if self._pg is not None and isinstance(exc, psycopg.OperationalError):
                self._pg.close()

        retry_transient(
            lambda: self.replay_batch(msgs, stats),
            budget_seconds=self.config.max_retry_seconds,
            on_retry=on_retry,
            what=f"DLQ replay batch of {len(msgs)} records",
        )

    def replay_batch(self, msgs: Sequence[Message], stats: ReplayStats) -> None:
        now_ms = int(time.time() * 1000)
        outcome: dict[str, list[Any]] = {"requeue": [], "park": [], "keep": []}
        applied = 0
        for target in TARGETS:
            letters: list[dlq.DeadLetter] = []
            for m in msgs:
                if TOPIC_TARGET.get(m.topic(), "") != target:
                    continue
                letter = dlq.DeadLetter.from_dlq_message(m, default_target=target)
                if not self.config.ignore_backoff and now_ms < due_at_ms(letter, self.config):
                    outcome["keep"].append(letter)
                    continue
                letters.append(letter)
            failures = self._apply(target, letters)
            for letter in letters:
                exc = failures.get(id(letter))
                if exc is None:
                    applied += 1
                    continue
                again = letter.retried(exc)
                # Older than the purge horizon: no later attempt can succeed, so it is parked at once.
                final = again.attempts >= self.config.max_attempts or isinstance(exc, BelowPurgeHorizonError)
                outcome["park" if final else "requeue"].append(again)
        # Durable before the source offsets are committed: republish, park, then commit.
        dlq.publish(self.producer, outcome["requeue"] + outcome["keep"])
        if outcome["park"]:
            dlq.publish(self.producer, outcome["park"], topic=dlq.PARKED_TOPIC)
            self._record_parked(outcome["park"])
        stats.read += len(msgs)
        stats.applied += applied
        stats.requeued += len(outcome["requeue"])
        stats.not_due += len(outcome["keep"])
        stats.parked += len(outcome["park"])

    def _apply(self, target: str, letters: Sequence[dlq.DeadLetter]) -> dict[int, BaseException]:
        """Apply letters to `target`; failures by id(letter). Store outages raise instead."""
        failures: dict[int, BaseException] = {}
        events = []
        for letter in letters:
            try:
                event = decode_event(letter.topic, letter.key, letter.value)
            except (MalformedEventError, UnknownTableError) as exc:
                failures[id(letter)] = exc
                continue
            if event is None:  # a tombstone needs nothing: the delete event carries the change
                continue
            try:
                check_not_below_horizon(event.version, self._horizon, f"dead letter {letter.topic}@{letter.offset}")
            except BelowPurgeHorizonError as exc:
                failures[id(letter)] = exc
                continue
            events.append((event, letter))
        if not events:
            return failures
        # A letter from before a truncate must not bring the emptied table's row back.
        truncated = truncate_horizons(self._pg_conn(), [])
        items = [below_truncate(i, truncated) for i in target_items(TARGETS[target], events, self._pg_conn)]
        result = self.writers[target].write(items)
        for item, exc in result.poison:
            for letter in item.sources:
                failures[id(letter)] = exc
        return failures

    def _record_parked(self, letters: Sequence[dlq.DeadLetter]) -> None:
        conn = self._pg_conn()
        with conn.transaction():
            for letter in letters:
                conn.execute(
                    "INSERT INTO ops.dlq_parked (target, source_topic, source_partition, source_offset, record_key, "
                    "record_value, error_class, error_message, attempts, first_failure_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (target, source_topic, source_partition, source_offset) DO UPDATE SET "
                    "record_key = EXCLUDED.record_key, record_value = EXCLUDED.record_value, error_class = EXCLUDED.error_class, error_message = EXCLUDED.error_message, "
                    "attempts = EXCLUDED.attempts, parked_at = now(), resolved_at = NULL",
                    (
                        letter.target,
                        letter.topic,
                        letter.partition,
                        letter.offset,
                        letter.key,
                        letter.value,
                        letter.error_class,
                        letter.error_message,
                        letter.attempts,
                        datetime.fromtimestamp(letter.first_failure_ms / 1000, UTC),
                    ),
                )
        conn.commit()


def dlq_depths(bootstrap: str, group_id: str = REPLAY_GROUP) -> dict[str, int]:
    """Records waiting in each DLQ topic for the replay group, plus the parked topic's size."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(timeout=5).topics
        depths: dict[str, int] = {}
        for topic in [*TOPIC_TARGET, dlq.PARKED_TOPIC]:
            if topic not in meta:
                depths[topic] = 0
                continue
            parts = [TopicPartition(topic, p) for p in meta[topic].partitions]
            committed = consumer.committed(parts, timeout=5) if topic != dlq.PARKED_TOPIC else parts
            total = 0
            for tp in committed:
                low, high = consumer.get_watermark_offsets(tp, timeout=5)
                start = low if topic == dlq.PARKED_TOPIC or tp.offset < 0 else max(tp.offset, low)
                total += max(0, high - start)
            depths[topic] = total
        return depths
    finally:
        consumer.close()
