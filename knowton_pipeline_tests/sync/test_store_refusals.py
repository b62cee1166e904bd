"""A store that refuses writes as a whole is an outage: the batch is held and retried, nothing is dead-lettered,
and the records apply once the store takes writes again. Only a record that fails on its own is poison."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import TABLES
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores.clickhouse import clickhouse_fault
from knowton_pipeline.lib.stores.elasticsearch import elasticsearch_fault
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats, group_lag, sink_group
from knowton_pipeline_tests.helpers import (
    assert_reconciled,
    ch_row,
    es_source,
    insert_user,
    make_applier,
    topic_size,
    wait_for,
    wait_for_cdc,
)


def data_lag(settings: Settings, store: str) -> int:
    """Changes of the data topics the store's sink has not committed."""
    lag = group_lag(settings.kafka_bootstrap, sink_group(store), [t.topic for t in TABLES])
    return sum(lag.values())


def _dlq_sizes(settings: Settings) -> dict[str, int]:
    return {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()}


def test_write_block_on_the_users_index_holds_a_single_row_batch_until_lifted(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    dlq_before = _dlq_sizes(settings)
    es.indices.add_block(index="knowton-users", block="write")
    try:
        address = insert_user(pg, reputation=7)  # one row: one single-row batch
        wait_for_cdc(settings)
        result: dict[str, ApplyStats] = {}
        applier = make_applier(settings, ch, es, backoff_initial=0.2, backoff_max=1.0, max_retry_seconds=300.0)
        worker = threading.Thread(target=lambda: result.setdefault("stats", applier.run(max_seconds=300)))
        worker.start()
        # ClickHouse's sink is not held back by the blocked index: its group catches up meanwhile.
        wait_for(lambda: not data_lag(settings, "clickhouse"), timeout=60, what="the ClickHouse sink caught up")
        assert worker.is_alive(), "the apply committed past a write block"
        assert data_lag(settings, "elasticsearch") >= 1
    finally:
        es.indices.put_settings(index="knowton-users", settings={"index.blocks.write": None})
    worker.join(timeout=300)
    assert not worker.is_alive()
    stats = result["stats"]
    assert stats.retries >= 1
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    assert _dlq_sizes(settings) == dlq_before
    es.indices.refresh(index="knowton-users")
    assert es_source(es, "knowton-users", address)["reputation"] == 7  # type: ignore[index]
    assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None
    assert_reconciled(settings, ch, es, "User", [address])


def test_a_renamed_clickhouse_mirror_holds_a_single_row_batch_until_it_is_back(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    dlq_before = _dlq_sizes(settings)
    ch.command("RENAME TABLE knowton.users TO knowton.users_away")
    try:
        address = insert_user(pg, reputation=8)
        wait_for_cdc(settings)
        result: dict[str, ApplyStats] = {}
        applier = make_applier(settings, ch, es, backoff_initial=0.2, backoff_max=1.0, max_retry_seconds=300.0)
        worker = threading.Thread(target=lambda: result.setdefault("stats", applier.run(max_seconds=300)))
        worker.start()
        # The search sink is not held back by ClickHouse: the row is searchable while the mirror is away.
        wait_for(lambda: es_source(es, "knowton-users", address) is not None, timeout=60, what="the document")
        assert worker.is_alive(), "the apply committed past a missing ClickHouse table"
        assert data_lag(settings, "clickhouse") >= 1
    finally:
        ch.command("RENAME TABLE knowton.users_away TO knowton.users")
    worker.join(timeout=300)
    assert not worker.is_alive()
    stats = result["stats"]
    assert stats.retries >= 1
    assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
    assert _dlq_sizes(settings) == dlq_before
    assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 8  # type: ignore[index]
    es.indices.refresh(index="knowton-users")
    assert es_source(es, "knowton-users", address) is not None
    assert_reconciled(settings, ch, es, "User", [address])


@pytest.mark.parametrize(
    ("status", "error_type", "fault"),
    [
        (403, "cluster_block_exception", "store"),
        (400, "index_closed_exception", "store"),
        (404, "index_not_found_exception", "store"),
        (429, "es_rejected_execution_exception", "store"),
        (429, "circuit_breaking_exception", "store"),
        (503, "unavailable_shards_exception", "store"),
        (400, "some_error_this_writer_has_never_seen", "store"),
        (400, "document_parsing_exception", "document"),
        (400, "mapper_parsing_exception", "document"),
        (409, "version_conflict_engine_exception", "stale"),
    ],
)
def test_elasticsearch_errors_are_classified_by_cause(status: int, error_type: str, fault: str) -> None:
    assert elasticsearch_fault(status, error_type) == fault


def test_clickhouse_server_errors_are_classified_by_cause(ch: ClickHouseClient) -> None:
    def error_of(action: Callable[[], object]) -> BaseException:
        try:
            action()
        except Exception as exc:  # the real engine's own exception
            return exc
        raise AssertionError("ClickHouse accepted it")

    missing = error_of(lambda: ch.insert("knowton.no_such_mirror", [[1]], column_names=["id"]))
    assert clickhouse_fault(missing) == "store"
    bad_value = error_of(lambda: ch.insert("knowton.cdc_heartbeat", [["not an int"]], column_names=["id"]))
    assert clickhouse_fault(bad_value) == "row"
