"""A full rebuild of a search index goes to a new index and swaps the alias when complete; changes
CDC writes during the rebuild are not lost."""

from __future__ import annotations

import threading
from collections.abc import Callable

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.elasticsearch.indices import rebuild_search_index
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.rebuild import next_index_name, rebuild_index
from knowton_pipeline_tests.sync.conftest import es_source, insert_user


def test_next_index_name_counts_up_from_the_current_version() -> None:
    assert next_index_name("knowton-users", None) == "knowton-users-v1"
    assert next_index_name("knowton-users", "knowton-users-v1") == "knowton-users-v2"
    assert next_index_name("knowton-users", "knowton-users-v41") == "knowton-users-v42"


def test_rebuild_swaps_the_alias_once_complete_and_keeps_changes_made_meanwhile(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    before = insert_user(pg, reputation=1)
    apply()
    [old_index] = list(es.indices.get_alias(name="knowton-users"))
    searched_during_build: list[int] = []
    during: dict[str, str] = {}

    def meanwhile() -> None:
        # While the new index is complete but not yet live: search still answers from the old one,
        # and CDC keeps writing through the alias (to the old index).
        searched_during_build.append(es.count(index="knowton-users")["count"])
        pg.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (before,))
        during["address"] = insert_user(pg, reputation=3)
        apply()

    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        result = rebuild_index(conn, es, table("User"), before_swap=meanwhile)
    assert result.old_index == old_index and result.new_index == next_index_name("knowton-users", old_index)
    assert list(es.indices.get_alias(name="knowton-users")) == [result.new_index]
    assert not es.indices.exists(index=old_index)
    assert searched_during_build and searched_during_build[0] > 0
    assert result.copied_during_rebuild >= 2
    assert es_source(es, "knowton-users", before)["reputation"] == 2  # type: ignore[index]
    assert es_source(es, "knowton-users", during["address"])["reputation"] == 3  # type: ignore[index]
    # Searches through the alias still hide tombstones after the swap.
    assert es.indices.get_alias(name="knowton-users")[result.new_index]["aliases"]["knowton-users"]["filter"]


def test_search_never_sees_an_empty_or_partial_index_during_a_rebuild_job(
    caught_up: None, settings: Settings, es: Elasticsearch
) -> None:
    expected = es.count(index="knowton-users")["count"]
    counts: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            counts.append(es.count(index="knowton-users")["count"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = rebuild_search_index.execute_in_process(
            resources=build_resources(), run_config={"ops": {"rebuild_search_index_op": {"config": {"table": "User"}}}}
        )
    finally:
        done.set()
        watcher.join()
    assert result.success
    assert counts and min(counts) >= expected
    metadata = next(
        e.event_specific_data.metadata  # type: ignore[union-attr]
        for e in result.all_node_events
        if e.event_type_value == "STEP_OUTPUT"
    )
    assert metadata["rows"].value >= expected
    observed = {e.asset_key for e in result.get_asset_observation_events()}
    assert dg.AssetKey(["elasticsearch", "knowton-users"]) in observed
