"""Fixtures for the sync engine tests: an applier on the real stack and readers for both stores."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer, TopicPartition
from elasticsearch import Elasticsearch, NotFoundError

from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyConfig, ApplyStats, CdcApplier
from knowton_pipeline.stack.manager import Stack


@pytest.fixture
def ch(stack: Stack, settings: Settings) -> ClickHouseClient:
    return clickhouse.get_client(settings.clickhouse_dsn)


def make_applier(settings: Settings, ch: ClickHouseClient, es: Elasticsearch, **config: Any) -> CdcApplier:
    cfg = ApplyConfig(bootstrap=settings.kafka_bootstrap, **{"max_retry_seconds": 120.0, **config})
    return CdcApplier(cfg, clickhouse=ch, es=es, pg_conninfo=settings.pg_conninfo())


def wait_for_cdc(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until Debezium has published every change committed so far: it confirms an LSN to the
    slot only after Connect has flushed the records up to it to Kafka."""
    import time

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


@pytest.fixture
def apply(settings: Settings, ch: ClickHouseClient, es: Elasticsearch) -> Callable[[], ApplyStats]:
    """Run the CDC apply until the sync group has caught up with every change committed so far, and
    make its writes searchable."""

    def run() -> ApplyStats:
        wait_for_cdc(settings)
        stats = make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=180)
        es.indices.refresh(index="knowton-*")
        return stats

    return run


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


def new_address() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


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


def topic_size(settings: Settings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"size-{uuid.uuid4().hex}"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        return high - low
    finally:
        consumer.close()


def read_topic_from(settings: Settings, topic: str, start: int, count: int, timeout: float = 15.0) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, start)])
    out: list[Any] = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
        return out
    finally:
        consumer.close()


def topic_end(settings: Settings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"end-{uuid.uuid4().hex}"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


@pytest.fixture
def caught_up(apply: Callable[[], ApplyStats]) -> Iterator[None]:
    """Start each test from a caught-up pipeline, so its assertions see only its own changes."""
    apply()
    yield


def assert_reconciled(
    settings: Settings, ch: ClickHouseClient, es: Elasticsearch, table_name: str, keys: list[Any]
) -> None:
    """A full reconciliation of `table_name` with each of its stores reports none of `keys` (other tests' keys,
    drifted on purpose, are theirs to assert)."""
    from knowton_pipeline.catalog import table
    from knowton_pipeline.lib.reconcile.engine import ReconcileOptions
    from knowton_pipeline.lib.reconcile.run import reconcile_pair

    targets = ["clickhouse"] + (["elasticsearch"] if table(table_name).elasticsearch_index else [])
    options = ReconcileOptions(mode="full", threshold=64, settle_seconds=0.5)
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        for target in targets:
            d = reconcile_pair(table_name, target, conn=conn, clickhouse=ch, es=es, options=options).differences
            reported = {*d.missing_in_target, *d.extra_in_target, *d.different}
            assert not reported & set(keys), f"{table_name} in {target}: {sorted(reported & set(keys), key=str)}"
