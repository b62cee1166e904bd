"""Helpers the tests share: polling, rows for PostgreSQL, readers for the stores and topics, reconciliation
checks and an alert webhook receiver. The fixtures are in the conftest files."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer, Producer, TopicPartition
from elasticsearch import Elasticsearch, NotFoundError

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.canonical import Shape, canonical_from_row, row_hash
from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings
from knowton_pipeline.lib.stores.elasticsearch import canonical_from_es_source
from knowton_pipeline.lib.transform import ES_DELETED_FIELD
from knowton_pipeline.stack.process import pid_alive

if TYPE_CHECKING:
    from knowton_pipeline.lib.reconcile.engine import ReconcileResult
    from knowton_pipeline.lib.sync.apply import SideBySide

CDC_CONNECTOR = "postgres-cdc-source-connector"
TEST_OUTPUT = PROJECT_ROOT / "test-output"

# reconcile(name, target, mode=..., threshold=..., settle_seconds=...), the reconcile tests' fixture.
Reconcile = Callable[..., "ReconcileResult"]


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")


# --- the CDC apply -----------------------------------------------------------------------------


def make_applier(settings: Settings, ch: ClickHouseClient, es: Elasticsearch, **config: Any) -> SideBySide:
    """Both stores' sinks, each in its own group, run side by side."""
    from knowton_pipeline.lib.sync.apply import ApplyConfig, SideBySide

    cfg = ApplyConfig(bootstrap=settings.kafka_bootstrap, **{"max_retry_seconds": 120.0, **config})
    return SideBySide.of(cfg, {"clickhouse": ch, "elasticsearch": es}, settings.pg_conninfo())


def wait_for_cdc(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until Debezium has published every change committed so far: it confirms an LSN to the
    slot only after Connect has flushed the records up to it to Kafka."""
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = conn.execute(
                "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot'",
                (target,),
            ).fetchone()
            if done and done[0]:
                return
            time.sleep(0.2)
    raise AssertionError(f"Debezium did not confirm LSN {target} within {timeout} s")


# --- rows in PostgreSQL ------------------------------------------------------------------------


def new_address() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def unsaved_user(**values: Any) -> dict[str, Any]:
    """A whole `User` row PostgreSQL does not hold (a new address), for writing to a store directly."""
    now = datetime.now(UTC)
    address = values.pop("address", None) or new_address()
    return {
        "address": address,
        "username": f"u-{address[2:14]}",
        "email": None,
        "bio": None,
        "avatarUrl": None,
        "reputation": 0,
        "isVerified": False,
        "createdAt": now,
        "updatedAt": now,
        **values,
    }


def insert_user(pg: psycopg.Connection, **values: Any) -> str:
    address = values.pop("address", None) or new_address()
    row = {"username": f"u-{address[2:14]}", "reputation": 1, **values}
    cols = ", ".join(f'"{c}"' for c in ["address", *row])
    marks = ", ".join(["%s"] * (len(row) + 1))
    pg.execute(f'INSERT INTO "User" ({cols}) VALUES ({marks})', [address, *row.values()])
    return address


def insert_content(pg: psycopg.Connection, creator: str, **values: Any) -> int:
    row = {"title": "A title", "category": "art", "price": Decimal("5.00"), "status": "published", **values}
    cols = ", ".join(f'"{c}"' for c in ["creator", *row])
    marks = ", ".join(["%s"] * (len(row) + 1))
    return pg.execute(
        f'INSERT INTO "Content" ({cols}) VALUES ({marks}) RETURNING id', [creator, *row.values()]
    ).fetchone()[0]  # type: ignore[index]


def insert_purchase(pg: psycopg.Connection, content_id: int, buyer: str, **values: Any) -> int:
    row = {"amount": Decimal("5.000000"), "currency": "ETH", "status": "completed", **values}
    cols = ", ".join(f'"{c}"' for c in ["contentId", "buyer", *row])
    marks = ", ".join(["%s"] * (len(row) + 2))
    return pg.execute(
        f'INSERT INTO "Purchase" ({cols}) VALUES ({marks}) RETURNING id', [content_id, buyer, *row.values()]
    ).fetchone()[0]  # type: ignore[index]


# --- the stores and the topics -----------------------------------------------------------------


def ch_row(ch: ClickHouseClient, table: str, where: str, params: dict[str, Any]) -> dict[str, Any] | None:
    result = ch.query(f"SELECT * FROM knowton.{table} FINAL WHERE {where}", parameters=params)
    rows = list(result.named_results())
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def es_source(es: Elasticsearch, index: str, doc_id: str) -> dict[str, Any] | None:
    try:
        return es.get(index=index, id=doc_id)["_source"]
    except NotFoundError:
        return None


def topic_size(settings: Settings, topic: str) -> int:
    """Records in every partition of `topic`."""
    return sum(topic_end(settings, topic).values()) - sum(_watermarks(settings, topic, 0).values())


def _watermarks(settings: Settings, topic: str, which: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"marks-{uuid.uuid4().hex}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[which] for p in partitions}
    finally:
        consumer.close()


def topic_end(settings: Settings, topic: str) -> dict[int, int]:
    """The end offset of each partition of `topic`: where a read of what comes next starts."""
    return _watermarks(settings, topic, 1)


def read_topic_from(
    settings: Settings, topic: str, start: Mapping[int, int], count: int, timeout: float = 15.0
) -> list[Any]:
    """Up to `count` records of `topic` from `start` (per partition, as `topic_end` gave it), in each partition's
    order."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in start.items()])
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
        return out
    finally:
        consumer.close()


def produce(settings: Settings, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
    """Write one record to `topic` as a producer elsewhere would; returns its (partition, offset)."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    where: dict[str, tuple[int, int]] = {}
    producer.produce(
        topic,
        key=key,
        value=value,
        on_delivery=lambda err, msg: where.setdefault("at", (msg.partition(), msg.offset())),
    )
    producer.flush(10)
    return where["at"]


# --- reconciliation ----------------------------------------------------------------------------


def assert_reconciled(
    settings: Settings, ch: ClickHouseClient, es: Elasticsearch, table_name: str, keys: list[Any]
) -> None:
    """A full reconciliation of `table_name` with each of its stores reports none of `keys` (other tests' keys,
    drifted on purpose, are theirs to assert)."""
    from knowton_pipeline.catalog import table
    from knowton_pipeline.lib.reconcile.engine import ReconcileOptions
    from knowton_pipeline.lib.reconcile.run import reconcile_pair
    from knowton_pipeline.lib.stores import targets_of

    clients = {"clickhouse": ch, "elasticsearch": es}
    options = ReconcileOptions(mode="full", threshold=64, settle_seconds=0.5)
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        for store in targets_of(table(table_name)):
            target = store.name
            d = reconcile_pair(table_name, target, conn=conn, clients=clients, options=options).differences
            reported = {*d.missing_in_target, *d.extra_in_target, *d.different}
            assert not reported & set(keys), f"{table_name} in {target}: {sorted(reported & set(keys), key=str)}"


def new_keys(after: ReconcileResult, before: ReconcileResult) -> dict[str, Any]:
    """What `after` reports beyond `before` (drift left by earlier tests stays out of the assertions)."""
    a, b = after.differences, before.differences
    return {
        "missing": sorted(set(a.missing_in_target) - set(b.missing_in_target)),
        "extra": sorted(set(a.extra_in_target) - set(b.extra_in_target)),
        "different": {k: v for k, v in a.different.items() if b.different.get(k) != v},
    }


# --- the alert webhook -------------------------------------------------------------------------


class Receiver:
    """A real HTTP endpoint that records what the alert webhook posts.

    `fail_with(status, times)` makes it answer the next `times` posts (every post when None) with
    `status` instead of 200; `received` holds only the posts it accepted, `attempts` every post."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                attempts.append(body)
                status = receiver._next_status()
                if status == 200:
                    received.append(body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.attempts = attempts
        self._lock = threading.Lock()
        self._fail_status = 200
        self._fail_times: int | None = 0
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_with(self, status: int, times: int | None = None) -> None:
        with self._lock:
            self._fail_status, self._fail_times = status, times

    def heal(self) -> None:
        self.fail_with(200, 0)

    def _next_status(self) -> int:
        with self._lock:
            if self._fail_times is None:
                return self._fail_status
            if self._fail_times > 0:
                self._fail_times -= 1
                return self._fail_status
            return 200

    def texts(self) -> list[str]:
        return [r["text"] for r in self.received]


# ---------------------------------------------------------------------------------------------------------------
# Canonical rows and checksums computed in Python, to compare with what the stores compute


def python_segment_checksum(
    table: SyncedTable, rows: Iterable[Mapping[str, Any]], *, shape: Shape = "mirror"
) -> tuple[int, int]:
    """(count, sum of row_hash) over Python rows (enriched rows for a document). The caller chooses the rows."""
    count = total = 0
    for row in rows:
        count += 1
        total += row_hash(canonical_from_row(table, row, shape=shape))
    return count, total


# ---------------------------------------------------------------------------------------------------------------
# Key segments


def sources_checksum(table: SyncedTable, sources: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(count, sum of row_hash) over `_source`s, tombstones (`is_deleted: true`) skipped: what the index's
    checksum of the same documents must be."""
    count = total = 0
    for source in sources:
        if source.get(ES_DELETED_FIELD) is True:
            continue
        count += 1
        total += row_hash(canonical_from_es_source(table, source))
    return count, total


def key_of(table: SyncedTable, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The key of a Python row (PostgreSQL column names), as a tuple in `table.key` order."""
    return tuple(row[k] for k in table.key)


def key_of_source(table: SyncedTable, source: Mapping[str, Any]) -> tuple[Any, ...]:
    """The key of an Elasticsearch `_source`, as a tuple in `table.key` order."""
    return tuple(source[table.column(k).target_name] for k in table.key)


def processes_mentioning(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (used to prove `down` left nothing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and pid_alive(int(entry.name), marker):
            found.append(int(entry.name))
    return found
