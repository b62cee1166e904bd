"""A row with a large value (a long bio, a big jsonb document) is an ordinary change: its event, which carries the
row twice, passes through Kafka whole and reaches both stores, and a batch of large documents goes to
Elasticsearch in requests it takes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.kafka_connect.assets import CDC_CONNECTOR
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import ch_row, es_source, insert_user, unsaved_user

USERS = table("User")


def test_a_row_with_a_value_of_megabytes_reaches_both_stores_and_cdc_keeps_running(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
    connect_client: KafkaConnectClient,
) -> None:
    bio = "a long bio, é ✓ " * 200_000  # 3.6 MB of UTF-8
    user = insert_user(pg, bio=bio)
    pg.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (user,))  # an event holding the bio twice
    behind = insert_user(pg)  # a change streamed after it
    apply()

    status = connect_client.status(CDC_CONNECTOR)
    assert status is not None
    assert status["connector"]["state"] == "RUNNING"
    assert [t["state"] for t in status["tasks"]] == ["RUNNING"]
    row = ch_row(ch, "users", "address = {a:String}", {"a": user})
    assert row is not None and row["bio"] == bio
    doc = es_source(es, "knowton-users", user)
    assert doc is not None and doc["bio"] == bio
    assert es_source(es, "knowton-users", behind) is not None


def test_a_batch_of_documents_larger_than_one_request_is_written_in_several(es: Elasticsearch) -> None:
    index = f"knowton-large-{uuid.uuid4().hex[:8]}"  # throwaway: the pipeline's index holds only synced rows
    es.indices.create(index=index)
    try:
        items = [WriteItem(USERS, unsaved_user(bio=f"{i} " + "x" * 50_000), 10 + i, False) for i in range(12)]
        requests: list[int] = []  # the size of each bulk request the writer sends
        bulk = es.bulk

        def counted_bulk(*, operations: bytes, **kwargs: Any) -> Any:
            requests.append(len(operations))
            return bulk(operations=operations, **kwargs)

        es.bulk = counted_bulk  # type: ignore[method-assign]  # the real request, counted on its way
        writer = ElasticsearchWriter(es, index_names={"knowton-users": index}, request_bytes=120_000)
        outcome = writer.send(writer.prepare(items))
        assert (outcome.written, outcome.poison, outcome.stale) == (12, [], 0)
        assert len(requests) == 6 and all(size <= 120_000 for size in requests)  # two documents a request
        es.indices.refresh(index=index)
        for i, item in enumerate(items):
            doc = es_source(es, index, item.row["address"])
            assert doc is not None and doc["bio"] == item.row["bio"] and doc["pg_lsn"] == 10 + i
    finally:
        es.options(ignore_status=404).indices.delete(index=index)
