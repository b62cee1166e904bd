"""CDC apply on the real stack: changes reach both stores, versions keep the newest state, poison goes
to the DLQ with its headers, and an outage or a crash loses nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Producer
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyConfig, ApplyStats, CdcSink
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import (
    ch_row,
    es_source,
    insert_content,
    insert_purchase,
    insert_user,
    make_applier,
    produce,
    read_topic_from,
    topic_end,
    topic_size,
    wait_for,
    wait_for_cdc,
)
from knowton_pipeline_tests.sync.test_store_refusals import data_lag


def test_insert_update_delete_of_each_table_reach_clickhouse_and_elasticsearch(
    caught_up: None, apply: Callable[[], ApplyStats], pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    creator = insert_user(pg, username="creator-a", bio="héllo 🌍")
    buyer = insert_user(pg)
    content = insert_content(pg, creator, price=Decimal("5.00"), tags=["x", "ü"], metadata='{"b": 1, "a": [1, 2]}')
    purchase = insert_purchase(pg, content, buyer, amount=Decimal("5.100000"))
    apply()

    user_row = ch_row(ch, "users", "address = {a:String}", {"a": creator})
    assert user_row is not None and user_row["bio"] == "héllo 🌍" and user_row["is_deleted"] == 0
    content_row = ch_row(ch, "contents", "id = {i:Int64}", {"i": content})
    assert content_row is not None
    assert content_row["price"] == Decimal("5.00") and content_row["tags"] == ["x", "ü"]
    assert json.loads(content_row["metadata"]) == {"a": [1, 2], "b": 1}
    purchase_row = ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchase})
    assert purchase_row is not None and purchase_row["amount"] == Decimal("5.100000")

    user_doc = es_source(es, "knowton-users", creator)
    assert user_doc is not None and user_doc["username"] == "creator-a" and user_doc["is_deleted"] is False
    content_doc = es_source(es, "knowton-contents", str(content))
    assert content_doc is not None
    assert content_doc["price"] == "5.00"
    assert content_doc["creator_username"] == "creator-a"
    assert content_doc["sales_count"] == 1

    # Updates, including the ones the content document shows from other tables.
    pg.execute('UPDATE "User" SET username = %s WHERE address = %s', ("creator-b", creator))
    pg.execute('UPDATE "Content" SET title = %s WHERE id = %s', ("New title", content))
    pg.execute('UPDATE "Purchase" SET status = %s WHERE id = %s', ("refunded", purchase))
    apply()
    assert ch_row(ch, "users", "address = {a:String}", {"a": creator})["username"] == "creator-b"  # type: ignore[index]
    assert ch_row(ch, "contents", "id = {i:Int64}", {"i": content})["title"] == "New title"  # type: ignore[index]
    assert ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchase})["status"] == "refunded"  # type: ignore[index]
    content_doc = es_source(es, "knowton-contents", str(content))
    assert content_doc is not None
    assert (content_doc["title"], content_doc["creator_username"], content_doc["sales_count"]) == (
        "New title",
        "creator-b",
        0,
    )

    # Deletes: hidden by FINAL in ClickHouse, versioned tombstones behind the alias in Elasticsearch.
    pg.execute('DELETE FROM "Purchase" WHERE id = %s', (purchase,))
    pg.execute('DELETE FROM "Content" WHERE id = %s', (content,))
    pg.execute('DELETE FROM "User" WHERE address = ANY(%s)', ([creator, buyer],))
    apply()
    assert ch_row(ch, "purchases", "id = {i:Int64}", {"i": purchase}) is None
    assert ch_row(ch, "contents", "id = {i:Int64}", {"i": content}) is None
    assert ch_row(ch, "users", "address = {a:String}", {"a": creator}) is None
    for index, doc_id in (("knowton-users", creator), ("knowton-contents", str(content))):
        assert es_source(es, index, doc_id)["is_deleted"] is True  # type: ignore[index]
        hits = es.search(index=index, query={"ids": {"values": [doc_id]}})["hits"]["hits"]
        assert hits == []


def test_duplicated_and_reordered_events_for_one_key_leave_the_newest_state(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    start = topic_end(settings, "cdc-User")
    address = insert_user(pg, reputation=1)
    pg.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (address,))
    pg.execute('UPDATE "User" SET reputation = 3 WHERE address = %s', (address,))
    apply()
    events = [m for m in read_topic_from(settings, "cdc-User", start, 50, timeout=5) if address.encode() in m.key()]
    assert len(events) == 3
    # Deliver them again, newest first and with duplicates, as a rebalance or a replay might: once in one batch
    # (the batch keeps each key's newest change) and once a record per batch (the stores refuse the older ones).
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    for batch_size in (2000, 1):
        for m in [events[2], events[0], events[1], events[0], events[2], events[1]]:
            producer.produce("cdc-User", key=m.key(), value=m.value())
        producer.flush(10)
        wait_for_cdc(settings)
        stats = make_applier(settings, ch, es, batch_size=batch_size).run(until_caught_up=True, max_seconds=180)
        es.indices.refresh(index="knowton-users")
        assert stats.events >= 6
        assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 3  # type: ignore[index]
        assert es_source(es, "knowton-users", address)["reputation"] == 3  # type: ignore[index]
    assert stats.stale >= 4  # Elasticsearch refused the older versions


def test_poison_record_goes_to_both_dlqs_with_headers_while_the_records_around_it_apply(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    before = {t: topic_end(settings, t) for t in dlq.TARGET_DLQ.values()}
    first = insert_user(pg)
    apply()  # so the poison lands between the two users' events
    poison_value = b'{"op": "c", "after": {"address": 42}, "source": {"lsn": 1, "ts_ms": 1, "table": "User"}}'
    poison_partition, poison_offset = produce(settings, "cdc-User", b'{"address": "0xpoison"}', poison_value)
    second = insert_user(pg)
    stats = apply()

    for address in (first, second):
        assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None
        assert es_source(es, "knowton-users", address) is not None
    assert stats.dead_lettered == {"clickhouse": 1, "elasticsearch": 1}
    for target, topic in dlq.TARGET_DLQ.items():
        [letter] = read_topic_from(settings, topic, before[topic], 1)
        assert letter.value() == poison_value
        headers = {k: v.decode() for k, v in letter.headers()}
        assert headers[dlq.H_TOPIC] == "cdc-User"
        assert headers[dlq.H_PARTITION] == str(poison_partition)
        assert headers[dlq.H_OFFSET] == str(poison_offset)
        assert headers[dlq.H_CLASS].endswith("MalformedEventError")
        assert "address" in headers[dlq.H_MESSAGE]
        assert headers[dlq.H_TARGET] == target
        assert headers[dlq.H_ATTEMPTS] == "1"
        assert abs(int(headers[dlq.H_FIRST_FAILURE]) / 1000 - time.time()) < 300


def test_elasticsearch_stopped_mid_apply_loses_nothing_and_dead_letters_nothing(
    caught_up: None,
    stack: Stack,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    dlq_before = {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()}
    addresses = [insert_user(pg, reputation=i) for i in range(20)]
    wait_for_cdc(settings)
    stack.down(["elasticsearch"])
    result: dict[str, ApplyStats] = {}
    applier = make_applier(settings, ch, es, backoff_initial=0.5, backoff_max=2.0, max_retry_seconds=300.0)
    worker = threading.Thread(target=lambda: result.setdefault("stats", applier.run(max_seconds=300)))
    try:
        worker.start()
        # ClickHouse's sink is not held back by the outage: its group catches up while Elasticsearch is down.
        wait_for(lambda: not data_lag(settings, "clickhouse"), timeout=60, what="the ClickHouse sink caught up")
        assert worker.is_alive(), "apply finished while Elasticsearch was down"
        assert data_lag(settings, "elasticsearch") >= 20
    finally:
        stack.up(["elasticsearch"])
    worker.join(timeout=300)
    assert not worker.is_alive()
    stats = result["stats"]
    assert stats.retries >= 1
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    assert {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()} == dlq_before
    es.indices.refresh(index="knowton-users")
    for i, address in enumerate(addresses):
        assert es_source(es, "knowton-users", address)["reputation"] == i  # type: ignore[index]
        assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None


class CrashAfterWrite(RuntimeError):
    pass


class CrashingSink(CdcSink):
    """Dies after the first batch is written and before its offsets are committed."""

    def finish_batch(self, batch, outcome, stats):  # type: ignore[no-untyped-def]
        super().finish_batch(batch, outcome, stats)
        raise CrashAfterWrite("simulated crash between write and commit")


def test_crash_between_write_and_commit_reapplies_without_harm(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg, reputation=5)
    pg.execute('UPDATE "User" SET reputation = 6 WHERE address = %s', (address,))
    wait_for_cdc(settings)
    for store, client in (("clickhouse", ch), ("elasticsearch", es)):
        crashing = CrashingSink(
            ApplyConfig(bootstrap=settings.kafka_bootstrap),
            store=store,
            client=client,
            pg_conninfo=settings.pg_conninfo(),
        )
        with pytest.raises(CrashAfterWrite):
            crashing.run(max_seconds=60)
    es.indices.refresh(index="knowton-users")
    version_after_crash = es.get(index="knowton-users", id=address)["_version"]
    stats = apply()  # the same records again: nothing was committed
    assert stats.events >= 2
    assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 6  # type: ignore[index]
    doc = es.get(index="knowton-users", id=address)
    assert doc["_source"]["reputation"] == 6
    assert doc["_version"] == version_after_crash  # the same LSN version, rewritten in place
    count = ch.query(
        "SELECT count() FROM knowton.users FINAL WHERE address = {a:String}", parameters={"a": address}
    ).result_rows[0][0]
    assert count == 1


def test_a_run_that_stops_when_caught_up_ends_under_a_steady_write_load(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
) -> None:
    # `apply_cdc` holds the embedded engine while it runs: it must end even while changes keep coming.
    first = insert_user(pg, reputation=21)
    wait_for_cdc(settings)
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                insert_user(conn)
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(3)
        sink = CdcSink(
            ApplyConfig(bootstrap=settings.kafka_bootstrap),
            store="clickhouse",
            client=ch,
            pg_conninfo=settings.pg_conninfo(),
        )
        stats = sink.run(until_caught_up=True, max_seconds=240)
        assert writer.is_alive(), "the writes went on while the run ended"
        assert stats.seconds < 240, "ended by reaching where the topics were when it started, not by its time limit"
        assert ch_row(ch, "users", "address = {a:String}", {"a": first})["reputation"] == 21  # type: ignore[index]
    finally:
        stop.set()
        writer.join()
    apply()
