"""The ClickHouse sink reads a batch's usual changes of a table as columns and writes them in one Arrow insert. On the
real stack: it leaves in the mirrors exactly what the row-by-row way leaves for the same records, and a block that
ClickHouse refuses for a value is written row by row, so only the row at fault is poison."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer, TopicPartition

from knowton_pipeline.catalog import table
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.debezium import ChangeColumns
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.sync.apply import ApplyConfig, ApplyStats, CdcSink
from knowton_pipeline_tests.helpers import insert_content, insert_purchase, insert_user, topic_end, wait_for_cdc

TOPICS = ("cdc-User", "cdc-Purchase")


class RowByRowWriter(ClickHouseWriter):
    """The same writer, made to take every change the row-by-row way: the reference the columns are held to."""

    takes_columns = False


def mirror_database(ch: ClickHouseClient, name: str) -> str:
    ch.command(f"DROP DATABASE IF EXISTS {name}")
    clickhouse.run_script(ch, read_sql("clickhouse", "mirrors.sql").replace("knowton", name))
    return name


def sink_from(settings: Settings, ch: ClickHouseClient, writer: ClickHouseWriter, starts: dict) -> CdcSink:
    """A ClickHouse sink in a throwaway group placed at `starts` (topic -> partition -> offset)."""
    group = f"knowton-test-columns-{uuid.uuid4().hex[:8]}"
    placer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        placer.commit(
            offsets=[TopicPartition(t, p, o) for t, ends in starts.items() for p, o in ends.items()], asynchronous=False
        )
    finally:
        placer.close()
    config = ApplyConfig(bootstrap=settings.kafka_bootstrap, group_id=group, topics=TOPICS, max_retry_seconds=60)
    return CdcSink(config, store="clickhouse", client=ch, pg_conninfo=settings.pg_conninfo(), writer=writer)


def newest_rows(ch: ClickHouseClient, database: str, mirror: str, key: str) -> list[tuple[Any, ...]]:
    """Each key's newest row as written, tombstones included."""
    return ch.query(f"SELECT * FROM {database}.{mirror} ORDER BY {key}, version DESC LIMIT 1 BY {key}").result_rows


def test_a_batch_read_as_columns_leaves_in_clickhouse_what_the_row_by_row_way_leaves(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    starts = {t: topic_end(settings, t) for t in TOPICS}
    users = [insert_user(pg, bio="héllo 🌍" if i % 3 else None, reputation=i) for i in range(60)]
    content = insert_content(pg, users[0])
    purchases = [insert_purchase(pg, content, users[i], amount=Decimal(f"{i}.{i:06d}")) for i in range(30)]
    with pg.transaction():  # several changes of one row in one transaction share a version: the last one wins
        for address in users[:20]:
            pg.execute('UPDATE "User" SET reputation = reputation + 100 WHERE address = %s', (address,))
            pg.execute('UPDATE "User" SET "isVerified" = true WHERE address = %s', (address,))
    pg.execute('UPDATE "Purchase" SET status = %s WHERE id = ANY(%s)', ("refunded", purchases[:10]))
    pg.execute('DELETE FROM "Purchase" WHERE id = ANY(%s)', (purchases[20:],))
    pg.execute('DELETE FROM "User" WHERE address = ANY(%s)', (users[50:],))
    wait_for_cdc(settings)

    runs: dict[str, ApplyStats] = {}
    for name, writer_class in (("knowton_columns", ClickHouseWriter), ("knowton_rows", RowByRowWriter)):
        writer = writer_class(ch, database=mirror_database(ch, name))
        runs[name] = sink_from(settings, ch, writer, starts).run(until_caught_up=True, max_seconds=120)
    try:
        assert runs["knowton_columns"].columnar >= 60 + 30 + 40 + 10 + 10 + 10  # every change of both tables
        assert runs["knowton_rows"].columnar == 0
        assert runs["knowton_columns"].events == runs["knowton_rows"].events
        assert (
            runs["knowton_columns"].dead_lettered
            == runs["knowton_rows"].dead_lettered
            == {
                "clickhouse": 0,
                "elasticsearch": 0,
            }
        )
        for mirror, key in (("users", "address"), ("purchases", "id")):
            columns = newest_rows(ch, "knowton_columns", mirror, key)
            assert columns == newest_rows(ch, "knowton_rows", mirror, key)
            assert columns
        users_rows = {r[0]: r for r in newest_rows(ch, "knowton_columns", "users", "address")}
        assert users_rows[users[0]][5] == 100 and users_rows[users[0]][6] is True  # both updates of the transaction
        assert users_rows[users[1]][3] == "héllo 🌍"
        assert users_rows[users[55]][-1] == 1  # a tombstone
        purchase_rows = {r[0]: r for r in newest_rows(ch, "knowton_columns", "purchases", "id")}
        assert purchase_rows[purchases[7]][3] == Decimal("7.000007") and purchase_rows[purchases[7]][6] == "refunded"
        assert purchase_rows[purchases[25]][-1] == 1
    finally:
        for name in runs:
            ch.command(f"DROP DATABASE IF EXISTS {name}")


def test_a_block_clickhouse_refuses_for_a_value_is_written_row_by_row_and_only_the_row_at_fault_is_poison(
    ch: ClickHouseClient,
) -> None:
    users = table("User")
    database = mirror_database(ch, "knowton_refused_block")
    when = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    good = [
        {
            "address": f"0x{i:040x}",
            "username": f"u{i}",
            "email": None,
            "bio": None,
            "avatarUrl": None,
            "reputation": i,
            "isVerified": False,
            "createdAt": when,
            "updatedAt": when,
        }
        for i in range(3)
    ]
    bad = {**good[0], "address": "0xbad", "createdAt": "not a date"}
    rows = [*good, bad]
    # A block whose createdAt column ClickHouse cannot read for one row (it never comes from a Debezium record,
    # whose timestamps are checked as they are read): the refusal is about a value.
    types = {"reputation": pa.int32(), "updatedAt": pa.timestamp("us", tz="UTC"), "createdAt": pa.string()}
    values = {c.name: [r[c.name] for r in rows] for c in users.columns}
    values["createdAt"] = [
        v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in values["createdAt"]
    ]
    block = pa.table(
        {
            name: pa.array(v, type=types.get(name, pa.string() if name != "isVerified" else None))
            for name, v in values.items()
        }
    )
    changes = ChangeColumns(
        table=users,
        rows=block,
        key_columns=([r["address"] for r in rows],),
        versions=[10 + i for i in range(len(rows))],
        deletes=[False] * len(rows),
    )
    items = [WriteItem(users, r, 10 + i, False, (f"record {i}",)) for i, r in enumerate(rows)]
    try:
        writer = ClickHouseWriter(ch, database=database)
        prepared = writer.prepare([])
        writer.prepare_columns(prepared, changes, tombstones_below=0, items=lambda: items)
        outcome = writer.send(prepared)
        assert outcome.written == 3
        assert [item.sources for item, _ in outcome.poison] == [("record 3",)]
        written = ch.query(f"SELECT address, created_at FROM {database}.users ORDER BY address").result_rows
        assert written == [(r["address"], when.replace(tzinfo=None)) for r in good]
    finally:
        ch.command(f"DROP DATABASE IF EXISTS {database}")
