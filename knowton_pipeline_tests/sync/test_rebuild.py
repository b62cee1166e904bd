"""A full rebuild of a search index goes to a new index and swaps the alias when complete; every row is
copied whatever its creation time, and changes CDC writes during the rebuild, even by a bulk request
still under way when the alias moves, are not lost."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch, helpers

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.elasticsearch.indices import rebuild_search_index
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.rebuild import next_index_name, rebuild_index
from knowton_pipeline_tests.helpers import es_source, insert_user, unsaved_user

USER = table("User")


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


def _rebuild_users(es: Elasticsearch) -> dg.ExecuteInProcessResult:
    result = rebuild_search_index.execute_in_process(
        resources=build_resources(), run_config={"ops": {"rebuild_search_index_op": {"config": {"table": "User"}}}}
    )
    assert result.success
    es.indices.refresh(index="knowton-users")
    return result


def test_a_user_created_before_1970_is_in_the_rebuilt_index(
    caught_up: None, pg: psycopg.Connection, es: Elasticsearch
) -> None:
    old_timer = insert_user(pg, createdAt=datetime(1960, 5, 1, 12, tzinfo=UTC))
    [before] = list(es.indices.get_alias(name="knowton-users"))
    _rebuild_users(es)
    [after] = list(es.indices.get_alias(name="knowton-users"))
    assert after == next_index_name("knowton-users", before)
    doc = es_source(es, after, old_timer)
    assert doc is not None and doc["created_at"].startswith("1960-05-01T12:00:00")


def _unsaved_users(n: int) -> list[WriteItem]:
    """Search documents of users PostgreSQL does not hold, versioned far above any LSN the stack reaches:
    what CDC would write through the alias, without touching the source."""
    bio = "written by a bulk request under way while the alias moves " * 4
    return [
        WriteItem(USER, unsaved_user(username=f"inflight-{i}", bio=bio, reputation=i), 2**60 + i, False)
        for i in range(n)
    ]


def _shard_bulk_running(es: Elasticsearch) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the task list is flagged "technical preview" by the client
        return bool(es.tasks.list(actions="indices:data/write/bulk[s]*", group_by="none")["tasks"])


def test_a_bulk_request_under_way_when_the_alias_moves_loses_nothing(
    caught_up: None, settings: Settings, pg: psycopg.Connection, es: Elasticsearch
) -> None:
    """A bulk that resolved the alias to the old index before the swap, and writes to it only seconds after
    (here: held by `wait_for_active_shards=all` until the old index's unassignable replica is dropped):
    the rebuild waits for it and copies what it wrote; nothing is left behind in the deleted old index."""
    items = _unsaved_users(200)
    operations = b"".join(ElasticsearchWriter(es).prepare(items).payload[0])
    held = Elasticsearch(settings.es_url, request_timeout=120)
    answers: list[dict] = []
    timeline: dict[str, float] = {}
    [old] = list(es.indices.get_alias(name="knowton-users"))

    def bulk_through_the_alias() -> None:
        answers.append(
            held.bulk(
                operations=operations, wait_for_active_shards="all", timeout="90s", filter_path="errors,items.*.status"
            )
        )
        timeline["written"] = time.monotonic()

    def release_after_the_swap() -> None:
        while old in es.indices.get_alias(name="knowton-users"):
            time.sleep(0.01)
        timeline["swapped"] = time.monotonic()
        time.sleep(3.0)  # the bulk lands in the old index well after the alias moved
        es.options(ignore_status=404).indices.put_settings(index=old, settings={"index": {"number_of_replicas": 0}})

    bulk = threading.Thread(target=bulk_through_the_alias)
    release = threading.Thread(target=release_after_the_swap)

    def start_a_held_bulk() -> None:
        es.indices.put_settings(index=old, settings={"index": {"number_of_replicas": 1}})  # never assigned: one node
        bulk.start()
        deadline = time.monotonic() + 60
        # The shard-level request exists once the coordinating node has resolved the alias (to the old index).
        while not _shard_bulk_running(es):
            assert time.monotonic() < deadline, "the bulk request never reached its shard"
            time.sleep(0.01)
        release.start()

    try:
        with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
            result = rebuild_index(conn, es, USER, before_swap=start_a_held_bulk)
        bulk.join(timeout=120)
        release.join(timeout=120)
        assert result.old_index == old and not es.indices.exists(index=old)
        found = {
            d["_id"]: d["_version"]
            for d in es.mget(index=result.new_index, ids=[i.row["address"] for i in items], source=False)["docs"]
            if d.get("found")
        }
        missing = [i for i in items if i.row["address"] not in found]
        assert not missing, f"{len(missing)} of {len(items)} documents written to the old index after the swap lost"
        assert all(found[i.row["address"]] == i.version for i in items)
        [answer] = answers
        assert not answer["errors"] and {next(iter(i.values()))["status"] for i in answer["items"]} == {201}
        assert timeline["written"] - timeline["swapped"] > 2.0  # it really landed after the swap
    finally:
        bulk.join(timeout=120)
        release.join(timeout=120)
        held.close()
        # The documents stand for no PostgreSQL row: take them out so later checks see only real users.
        [current] = list(es.indices.get_alias(name="knowton-users"))
        deletes = ({"_op_type": "delete", "_index": current, "_id": i.row["address"]} for i in items)
        helpers.bulk(es, deletes, raise_on_error=False, refresh=True)
