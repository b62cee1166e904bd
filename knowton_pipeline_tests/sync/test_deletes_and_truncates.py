"""Deletes apply from their key alone and a TRUNCATE reaches both stores, on the real stack: an old value the
decoder refuses, a key-only old image or a truncate never leaves a row live in ClickHouse or Elasticsearch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.debezium import decode_event
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import (
    assert_reconciled,
    ch_row,
    es_source,
    insert_content,
    insert_purchase,
    insert_user,
    produce,
    read_topic_from,
    topic_end,
)


def _content_in_stores(ch: ClickHouseClient, es: Elasticsearch, content_id: int) -> tuple[dict | None, dict | None]:
    doc = es_source(es, "knowton-contents", str(content_id))
    return ch_row(ch, "contents", "id = {i:Int64}", {"i": content_id}), None if doc is None or doc[
        "is_deleted"
    ] else doc


def test_a_nan_price_fixed_then_deleted_leaves_no_live_row(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg)
    content = insert_content(pg, creator, price=Decimal("5.00"))
    apply()
    dlq_before = {t: topic_end(settings, t) for t in dlq.TARGET_DLQ.values()}

    # numeric NaN: PostgreSQL accepts it (and it passes price >= 0), neither store can hold it.
    pg.execute('UPDATE "Content" SET price = %s WHERE id = %s', ("NaN", content))
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 1, "elasticsearch": 1}
    for topic in dlq.TARGET_DLQ.values():
        [letter] = read_topic_from(settings, topic, dlq_before[topic], 1)
        message = dict(letter.headers())[dlq.H_MESSAGE].decode()
        assert "Content.price" in message and "finite" in message  # a clear per-row reason

    # The correction's old image holds the NaN: it only informs, so the update applies.
    pg.execute('UPDATE "Content" SET price = 7, title = %s WHERE id = %s', ("fixed", content))
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    row, doc = _content_in_stores(ch, es, content)
    assert row is not None and row["price"] == Decimal("7.00") and row["title"] == "fixed"
    assert doc is not None and doc["price"] == "7.00" and doc["title"] == "fixed"

    # Back to NaN and deleted straight away: the delete's old image holds the NaN, the delete needs only its key.
    pg.execute('UPDATE "Content" SET price = %s WHERE id = %s', ("NaN", content))
    pg.execute('DELETE FROM "Content" WHERE id = %s', (content,))
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 1, "elasticsearch": 1}  # the NaN update only
    assert _content_in_stores(ch, es, content) == (None, None)
    assert_reconciled(settings, ch, es, "Content", [content])


def test_an_infinite_timestamp_and_a_null_tag_never_block_the_delete(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg)
    content = insert_content(pg, creator)
    apply()
    pg.execute('UPDATE "Content" SET "createdAt" = %s, tags = %s WHERE id = %s', ("infinity", ["a", None], content))
    pg.execute('UPDATE "User" SET "updatedAt" = %s WHERE address = %s', ("-infinity", creator))
    apply()
    pg.execute('DELETE FROM "Content" WHERE id = %s', (content,))
    pg.execute('DELETE FROM "User" WHERE address = %s', (creator,))
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    assert _content_in_stores(ch, es, content) == (None, None)
    assert ch_row(ch, "users", "address = {a:String}", {"a": creator}) is None
    doc = es_source(es, "knowton-users", creator)
    assert doc is not None and doc["is_deleted"] is True
    assert_reconciled(settings, ch, es, "Content", [content])
    assert_reconciled(settings, ch, es, "User", [creator])


@pytest.fixture
def user_identity_default(pg: psycopg.Connection) -> Iterator[None]:
    pg.execute('ALTER TABLE "User" REPLICA IDENTITY DEFAULT')
    try:
        yield
    finally:
        pg.execute('ALTER TABLE "User" REPLICA IDENTITY FULL')


def test_deletes_with_replica_identity_default_carry_only_the_key_and_still_apply(
    caught_up: None,
    user_identity_default: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg, bio="to be removed")
    pg.execute('UPDATE "User" SET reputation = 3 WHERE address = %s', (address,))
    apply()
    assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 3  # type: ignore[index]
    pg.execute('DELETE FROM "User" WHERE address = %s', (address,))
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is None
    doc = es_source(es, "knowton-users", address)
    assert doc is not None and doc["is_deleted"] is True
    assert_reconciled(settings, ch, es, "User", [address])


def test_truncate_purchase_turns_its_rows_into_tombstones_that_a_stale_write_cannot_resurrect(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator, buyer = insert_user(pg), insert_user(pg)
    content = insert_content(pg, creator)
    purchases = [insert_purchase(pg, content, buyer) for _ in range(3)]
    apply()
    assert es_source(es, "knowton-contents", str(content))["sales_count"] == 3  # type: ignore[index]
    assert_reconciled(settings, ch, es, "Purchase", purchases)
    kept = pg.execute('SELECT * FROM "Purchase"').fetchall()
    columns = [d.name for d in pg.execute('SELECT * FROM "Purchase" LIMIT 0').description or []]
    old_versions = dict(
        ch.query(
            "SELECT id, version FROM knowton.purchases FINAL WHERE id IN {ids:Array(Int64)}",
            parameters={"ids": purchases},
        ).result_rows
    )

    pg.execute('TRUNCATE "Purchase"')
    stats = apply()
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    live = ch.query("SELECT count() FROM knowton.purchases FINAL").result_rows[0][0]
    assert live == 0
    tombstones = ch.query(
        "SELECT count() FROM knowton.purchases WHERE is_deleted = 1 AND id IN {ids:Array(Int64)}",
        parameters={"ids": purchases},
    ).result_rows[0][0]
    assert tombstones == len(purchases)
    # What the search documents show from Purchase follows: no sales any more.
    assert es_source(es, "knowton-contents", str(content))["sales_count"] == 0  # type: ignore[index]
    assert_reconciled(settings, ch, es, "Purchase", purchases)
    assert_reconciled(settings, ch, es, "Content", [content])

    # A stale write from before the truncate (a replay, a late backfill) is refused by the tombstone's version.
    from knowton_pipeline.catalog import table
    from knowton_pipeline.lib.stores import WriteItem
    from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter

    stale_row = dict(zip(columns, next(r for r in kept if r[0] == purchases[0]), strict=True))
    ClickHouseWriter(ch).write([WriteItem(table("Purchase"), stale_row, old_versions[purchases[0]], False)])
    assert ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchases[0]}) is None

    # Rows written after the truncate are live again (the other tests' purchases are put back too).
    with (
        pg.cursor() as cur,
        cur.copy(f'COPY "Purchase" ({", ".join(chr(34) + c + chr(34) for c in columns)}) FROM STDIN') as copy,
    ):
        for r in kept:
            copy.write_row(r)
    apply()
    assert ch.query("SELECT count() FROM knowton.purchases FINAL").result_rows[0][0] == len(kept)
    assert es_source(es, "knowton-contents", str(content))["sales_count"] == 3  # type: ignore[index]
    assert_reconciled(settings, ch, es, "Purchase", purchases)


def test_a_change_from_before_a_truncate_that_arrives_after_it_stays_a_tombstone(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    # With several partitions per topic, a change committed before a TRUNCATE can reach a sink after it (the
    # truncate has no key, so it lands in any partition). Here: the insert of a purchase the mirror does not hold
    # (removed behind the pipeline's back) is delivered again after the truncate was applied.
    start = topic_end(settings, "cdc-Purchase")
    creator, buyer = insert_user(pg), insert_user(pg)
    content = insert_content(pg, creator)
    purchase = insert_purchase(pg, content, buyer)
    apply()
    [created] = [
        m
        for m in read_topic_from(settings, "cdc-Purchase", start, 50, timeout=5)
        if (e := decode_event(m.topic(), m.key(), m.value())) is not None and e.key == (purchase,)
    ]
    kept = pg.execute('SELECT * FROM "Purchase"').fetchall()
    columns = [d.name for d in pg.execute('SELECT * FROM "Purchase" LIMIT 0').description or []]
    pg.execute('TRUNCATE "Purchase"')
    try:
        apply()
        ch.command(f"ALTER TABLE knowton.purchases DELETE WHERE id = {int(purchase)}", settings={"mutations_sync": 2})
        assert ch.query(f"SELECT count() FROM knowton.purchases WHERE id = {int(purchase)}").result_rows[0][0] == 0

        produce(settings, "cdc-Purchase", created.key(), created.value())
        apply()
        assert ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchase}) is None, "the truncated row came back"
        tombstones = f"SELECT count() FROM knowton.purchases WHERE id = {int(purchase)} AND is_deleted = 1"
        assert ch.query(tombstones).result_rows[0][0] == 1
    finally:
        with (  # the other tests' purchases are put back
            pg.cursor() as cur,
            cur.copy(f'COPY "Purchase" ({", ".join(chr(34) + c + chr(34) for c in columns)}) FROM STDIN') as copy,
        ):
            for r in kept:
                copy.write_row(r)
    apply()
    assert ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchase}) is not None
    assert_reconciled(settings, ch, es, "Purchase", [purchase])
