"""Has a store's sink applied past a source position? The reconciliation's re-check asks it, so a difference is
confirmed against a known position instead of after a fixed wait (docs/architecture.md, "Nothing lost, nothing
hidden").

The position P comes from an anchor committed after the comparison read the source (`versions.anchor_position`).
The store has applied past P once (a) Debezium has published a record of the heartbeat topic whose source LSN is
at least P: it publishes in commit order, so every change the comparison's source read could see is in Kafka by
then; and (b) the store's sink group has committed, on every `cdc-*` data partition, at least the end offset read
after (a): a sink commits only after its store holds the batch. Nothing but Kafka is read (no store is opened).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Literal

import orjson
import psycopg
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from knowton_pipeline.catalog import HEARTBEAT, TABLES
from knowton_pipeline.lib.sync.apply import sink_group
from knowton_pipeline.lib.versions import anchor_position

Partition = tuple[str, int]
Applied = Literal["applied", "behind"]  # behind: not applied past the position before the deadline


class PositionUnknownError(RuntimeError):
    """Kafka or the sink's group could not be read: whether the store has applied a position is not known."""


def record_lsn(value: bytes | None) -> int | None:
    """The source LSN of a Debezium change event (JSON without schemas); None for a tombstone or another shape."""
    if not value:
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    source = event.get("source") if isinstance(event, dict) else None
    lsn = source.get("lsn") if isinstance(source, dict) else None
    return lsn if isinstance(lsn, int) and not isinstance(lsn, bool) and lsn > 0 else None


def applied_all(positions: Mapping[Partition, int], ends: Mapping[Partition, int]) -> bool:
    """Whether a group's positions (the next offset it will apply, per partition) reach every end offset; a
    partition the group holds no position for counts as not reached unless it is empty (end 0)."""
    return all(positions.get(tp, 0) >= end for tp, end in ends.items())


class SinkPositions:
    """Reads, from Kafka, how far Debezium has published and how far a store's sink has applied."""

    def __init__(self, bootstrap: str, store: str, *, timeout: float = 5.0):
        self.bootstrap, self.store, self.timeout = bootstrap, store, timeout
        self._opened: Consumer | None = None
        self._data: list[TopicPartition] | None = None

    @property
    def _consumer(self) -> Consumer:
        if self._opened is None:  # opened on first use: most reconciliations have nothing to re-check
            # The sink's own group id, only to read its committed offsets: this consumer never joins nor commits.
            self._opened = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": sink_group(self.store),
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 50,  # heartbeats are read as they come, while the caller waits
                }
            )
        return self._opened

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def data_partitions(self) -> list[TopicPartition]:
        if self._data is None:
            meta = self._consumer.list_topics(timeout=self.timeout).topics
            self._data = [
                TopicPartition(t.topic, p) for t in TABLES if t.topic in meta for p in meta[t.topic].partitions
            ]
        return self._data

    def follow_heartbeats(self) -> None:
        """Read the heartbeat topic from its newest record on: `published_past` then sees each record as it comes."""
        tp = TopicPartition(HEARTBEAT.topic, 0)
        low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout, cached=False)
        self._consumer.assign([TopicPartition(HEARTBEAT.topic, 0, max(low, high - 1))])

    def published_past(self, position: int, wait: float) -> bool:
        """Whether a heartbeat record read within `wait` seconds has a source LSN of `position` or above (records
        before one come in order: once it is in Kafka, so is every change committed before it)."""
        deadline = time.monotonic() + wait
        while True:
            msg = self._consumer.poll(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return False
            if msg.error() is None:
                lsn = record_lsn(msg.value())
                if lsn is not None and lsn >= position:
                    return True
            elif msg.error().code() != KafkaError._PARTITION_EOF:
                raise KafkaException(msg.error())
            if time.monotonic() >= deadline:
                return False

    def ends(self) -> dict[Partition, int]:
        """The end offset of every data partition, in one request (ListOffsets, latest)."""
        latest = [TopicPartition(tp.topic, tp.partition, OFFSET_END) for tp in self.data_partitions()]
        out: dict[Partition, int] = {}
        for tp in self._consumer.offsets_for_times(latest, timeout=self.timeout):
            if tp.error is not None or tp.offset < 0:
                raise KafkaException(f"no end offset for {tp.topic}[{tp.partition}]: {tp.error}")
            out[(tp.topic, tp.partition)] = tp.offset
        return out

    def applied(self) -> dict[Partition, int]:
        """The sink group's committed offsets on the data partitions (the low watermark where it has none)."""
        committed = self._consumer.committed(self.data_partitions(), timeout=self.timeout)
        if all(tp.offset < 0 for tp in committed):
            raise PositionUnknownError(f"{sink_group(self.store)} has committed no offset: no sink has run")
        out: dict[Partition, int] = {}
        for tp in committed:
            if tp.error is not None:
                raise PositionUnknownError(f"{tp.topic}[{tp.partition}]: {tp.error}")
            low = tp.offset if tp.offset >= 0 else self._consumer.get_watermark_offsets(tp, timeout=self.timeout)[0]
            out[(tp.topic, tp.partition)] = low
        return out


class PositionWatch:
    """Anchors a source position and waits, polling, until a store's sink has applied past it."""

    def __init__(self, conn: psycopg.Connection, positions: SinkPositions, *, poll_seconds: float = 0.25):
        self.conn, self.positions, self.poll_seconds = conn, positions, poll_seconds

    def anchor(self) -> int:
        """Commit an anchor on the source (after whatever was read before) and return its position."""
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.conn.rollback()  # a read-only transaction the sides left open: the anchor must commit
        return anchor_position(self.conn)

    def wait(self, position: int, deadline: float, on_wait: Callable[[float], None]) -> Applied:
        """Poll until the store has applied past `position`, or `deadline` (monotonic) passes; `on_wait(seconds
        waited)` is called between polls (it gives a store held by the caller, the embedded ClickHouse engine,
        its sink turns). Raises `PositionUnknownError` when Kafka cannot tell."""
        started = time.monotonic()
        ends: dict[Partition, int] | None = None
        try:
            self.positions.follow_heartbeats()
            while True:
                if ends is None and self.positions.published_past(position, self.poll_seconds):
                    ends = self.positions.ends()  # read after (a): every change before P is below these
                if ends is not None:
                    if applied_all(self.positions.applied(), ends):
                        return "applied"
                    time.sleep(self.poll_seconds)
                if time.monotonic() >= deadline:
                    return "behind"
                on_wait(time.monotonic() - started)
        except KafkaException as exc:
            raise PositionUnknownError(
                f"Kafka could not say how far {self.positions.store} has applied: {exc}"
            ) from exc

    def close(self) -> None:
        self.positions.close()


def position_watch(conn: psycopg.Connection, store: str, bootstrap: str | None) -> PositionWatch | None:
    """A watch of `store`'s sink, or None when no Kafka bootstrap is known (the re-check then waits a fixed time)."""
    if not bootstrap:
        return None
    return PositionWatch(conn, SinkPositions(bootstrap, store))


__all__ = ["PositionUnknownError", "PositionWatch", "SinkPositions", "applied_all", "position_watch", "record_lsn"]
