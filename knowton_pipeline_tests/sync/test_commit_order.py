"""Versions follow commit order on the real stack: a transaction open while a snapshot is taken (Debezium's
incremental snapshot, or the project's own backfill) has change LSNs below the snapshot's position but commits
after it, and its change wins over the snapshot's row in both stores."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.debezium import decode_event
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.backfill import backfill_range
from knowton_pipeline_tests.helpers import (
    assert_reconciled,
    ch_row,
    es_source,
    insert_user,
    read_topic_from,
    topic_end,
    wait_for_cdc,
)
from knowton_pipeline_tests.sync.test_backfill import today

USER = table("User")


def _reputation_in_stores(ch: ClickHouseClient, es: Elasticsearch, address: str) -> tuple[int, int]:
    es.indices.refresh(index="knowton-users")
    row, doc = ch_row(ch, "users", "address = {a:String}", {"a": address}), es_source(es, "knowton-users", address)
    assert row is not None and doc is not None
    return row["reputation"], doc["reputation"]


def test_a_transaction_open_across_an_incremental_snapshot_wins_over_the_snapshot_row(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg, reputation=1)
    apply()
    start = topic_end(settings, "cdc-User")
    with psycopg.connect(**settings.pg_conninfo()) as open_tx:  # type: ignore[arg-type]
        open_tx.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (address,))
        # Debezium snapshots the key while the update is uncommitted: it reads reputation 1.
        signal = {
            "data-collections": ["public.User"],
            "type": "incremental",
            "additional-conditions": [{"data-collection": "public.User", "filter": f"address = '{address}'"}],
        }
        pg.execute(
            "INSERT INTO ops.debezium_signal (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
            (uuid.uuid4().hex, json.dumps(signal)),
        )
        deadline = time.monotonic() + 60
        read: list = []
        while not read and time.monotonic() < deadline:
            records = read_topic_from(settings, "cdc-User", start, 50, timeout=2)
            read = [m for m in records if address.encode() in (m.key() or b"") and b'"op":"r"' in (m.value() or b"")]
        assert read, "Debezium did not snapshot the key within 60 s"
        open_tx.commit()
    wait_for_cdc(settings)
    records = [m for m in read_topic_from(settings, "cdc-User", start, 50, timeout=5) if address.encode() in m.key()]
    events = [decode_event("cdc-User", m.key(), m.value()) for m in records]
    snapshot_row = next(e for e in events if e is not None and e.op == "r")
    update = next(e for e in events if e is not None and e.op == "u")
    assert snapshot_row.row["reputation"] == 1 and update.row["reputation"] == 2
    # The scenario itself: the update's own LSN is below the snapshot's position, yet it committed later.
    assert update.lsn < snapshot_row.lsn
    assert update.version > snapshot_row.version

    apply()
    assert _reputation_in_stores(ch, es, address) == (2, 2)
    assert_reconciled(settings, ch, es, "User", [address])


@pytest.mark.parametrize("target", ["clickhouse", "elasticsearch"])
def test_a_backfill_does_not_wait_for_an_open_transaction_and_its_commit_wins(
    target: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg, reputation=1)
    apply()
    writer = ClickHouseWriter(ch) if target == "clickhouse" else ElasticsearchWriter(es)
    with psycopg.connect(**settings.pg_conninfo()) as open_tx:  # type: ignore[arg-type]
        open_tx.execute('UPDATE "User" SET reputation = 5 WHERE address = %s', (address,))
        insert_user(pg)  # a commit meanwhile flushes the WAL past the open transaction's change
        # The backfill finishes while the transaction is still open: it read reputation 1 and did not wait.
        with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
            stats = backfill_range(conn, USER, *today(), writer)
        assert stats.rows >= 1 and stats.written >= 1
        assert _reputation_in_stores(ch, es, address)[0 if target == "clickhouse" else 1] == 1
        open_tx.commit()
    apply()
    assert _reputation_in_stores(ch, es, address) == (5, 5)
    assert_reconciled(settings, ch, es, "User", [address])
