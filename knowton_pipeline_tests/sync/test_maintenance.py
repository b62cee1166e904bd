"""Maintenance against the real stack: deletes older than the window are gone from ClickHouse's storage and from
the index, newer ones stay, the tables still reconcile, a replay from before the window is refused, and the
project's own history is pruned by age. Deletes are aged by a WAL mark dated back, not by waiting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.maintenance import BelowPurgeHorizonError, RetentionPolicy, run_maintenance
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.replay import DlqReplayer, ReplayConfig
from knowton_pipeline_tests.helpers import (
    assert_reconciled,
    insert_user,
    make_applier,
    read_topic_from,
    topic_end,
    wait_for_cdc,
)

WINDOW = RetentionPolicy().tombstone_window


def stored_rows(ch: ClickHouseClient, address: str) -> int:
    """Every row the mirror stores for the key, FINAL or not: what a purge must remove."""
    return int(
        ch.query("SELECT count() FROM knowton.users WHERE address = {a:String}", parameters={"a": address}).result_rows[
            0
        ][0]
    )


def stored_document(es: Elasticsearch, address: str) -> dict | None:
    hits = es.search(index="knowton-users-v*", query={"ids": {"values": [address]}})["hits"]["hits"]
    return hits[0]["_source"] if hits else None


@pytest.fixture
def horizon_restored(pg: psycopg.Connection) -> Iterator[None]:
    """The purge horizon and WAL marks this test creates are removed afterwards, so later tests' replays of their
    own (older) events are not refused. What was purged stays purged."""
    marks = {r[0] for r in pg.execute("SELECT noted_at FROM ops.wal_marks").fetchall()}
    purges = pg.execute("SELECT coalesce(max(id), 0) FROM ops.purges").fetchone()[0]  # type: ignore[index]
    yield
    pg.execute("DELETE FROM ops.purges WHERE id > %s", (purges,))
    pg.execute("DELETE FROM ops.wal_marks WHERE NOT (noted_at = ANY(%s))", (list(marks),))


def test_maintenance_purges_deletes_past_the_window_keeps_newer_ones_and_refuses_older_writes(
    caught_up: None,
    horizon_restored: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    start = topic_end(settings, "cdc-User")
    old, recent, alive = insert_user(pg), insert_user(pg), insert_user(pg)
    apply()
    # Applied one by one, so the mirror holds several versions of the key until a merge.
    pg.execute('UPDATE "User" SET reputation = reputation + 1 WHERE address = %s', (old,))
    apply()
    pg.execute('DELETE FROM "User" WHERE address = %s', (old,))
    apply()
    assert stored_rows(ch, old) >= 1 and stored_document(es, old)["is_deleted"] is True  # type: ignore[index]
    # The delete of `old` is now older than the window: a WAL position past it, noted a window and a day ago.
    pg.execute(
        "INSERT INTO ops.wal_marks (noted_at, lsn) VALUES (now() - %s, pg_current_wal_lsn() - '0/0'::pg_lsn)",
        (WINDOW + timedelta(days=1),),
    )
    pg.execute('DELETE FROM "User" WHERE address = %s', (recent,))
    apply()

    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        report = run_maintenance(conn, {"clickhouse": ch, "elasticsearch": es})
    assert report.horizon is not None
    assert report.purged["clickhouse"]["User"] >= 1 and report.purged["elasticsearch"]["User"] >= 1

    assert stored_rows(ch, old) == 0, "every row of the purged key left ClickHouse's storage"
    assert stored_document(es, old) is None, "the tombstone left the index"
    assert stored_rows(ch, recent) >= 1 and stored_document(es, recent)["is_deleted"] is True  # type: ignore[index]
    assert stored_rows(ch, alive) == 1 and stored_document(es, alive)["is_deleted"] is False  # type: ignore[index]
    assert_reconciled(settings, ch, es, "User", [old, recent, alive])

    # A replay of `old`'s insert, from before the window, would bring it back: it is parked with the reason.
    [created] = [m for m in read_topic_from(settings, "cdc-User", start, 50, timeout=5) if old.encode() in m.key()][:1]
    parked_from = topic_end(settings, dlq.PARKED_TOPIC)
    letter = dlq.DeadLetter(
        target="clickhouse",
        topic="cdc-User",
        partition=created.partition(),
        offset=created.offset(),
        key=created.key(),
        value=created.value(),
        error_class="x",
        error_message="an old failure",
        first_failure_ms=1,
    )
    dlq.publish(dlq.make_producer(settings.kafka_bootstrap), [letter])
    DlqReplayer(
        ReplayConfig(bootstrap=settings.kafka_bootstrap, ignore_backoff=True),
        clickhouse=ch,
        es=es,
        pg_conninfo=settings.pg_conninfo(),
    ).run(max_seconds=120)
    parked = [
        dlq.DeadLetter.from_dlq_message(m, default_target="")
        for m in read_topic_from(settings, dlq.PARKED_TOPIC, parked_from, 50, timeout=5)
        if old.encode() in (m.key() or b"")
    ]
    assert parked and "purge horizon" in parked[0].error_message, parked
    assert parked[0].error_class.endswith(BelowPurgeHorizonError.__name__)
    assert stored_rows(ch, old) == 0, "the refused replay wrote nothing"


def test_the_apply_refuses_a_change_older_than_the_purge_horizon(
    caught_up: None,
    horizon_restored: None,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg)
    wait_for_cdc(settings)  # the change is in Kafka, so the apply below must meet it
    # A horizon above the change (the WAL position after its commit), as after a purge while the apply was further
    # behind than the window.
    pg.execute(
        "INSERT INTO ops.purges (store, table_name, below_version, removed) "
        "VALUES ('clickhouse', 'User', pg_current_wal_lsn() - '0/0'::pg_lsn, 0)"
    )
    with pytest.raises(BelowPurgeHorizonError, match="purge horizon"):
        make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=60)
    pg.execute("DELETE FROM ops.purges WHERE table_name = 'User' AND removed = 0 AND store = 'clickhouse'")
    make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=60)
    assert stored_rows(ch, address) == 1


def test_history_past_its_age_is_pruned_and_recent_history_kept(
    horizon_restored: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    policy = RetentionPolicy()
    pg.execute("DELETE FROM ops.dlq_parked WHERE source_topic = 'maintenance-test'")
    pg.execute("DELETE FROM ops.backfill_progress WHERE asset = 'maintenance-test'")
    ids = {}
    for label, age in (("old", policy.reconcile_history + timedelta(days=1)), ("new", timedelta(days=1))):
        ids[label] = pg.execute(
            "INSERT INTO ops.reconcile_runs (table_name, target, mode, started_at, seconds, source_rows, target_rows, "
            "missing, extra, different, in_flight, rows_compared, keys_recorded, clean) "
            "VALUES ('User', 'clickhouse', 'full', now() - %s, 1, 1, 1, 0, 0, 1, 0, 1, 1, false) RETURNING id",
            (age,),
        ).fetchone()[0]  # type: ignore[index]
        pg.execute(
            "INSERT INTO ops.reconcile_diffs (reconcile_id, key, kind) VALUES (%s, 'k', 'different')", (ids[label],)
        )
    for label, age in (("old", policy.backfill_progress + timedelta(days=1)), ("new", timedelta(hours=1))):
        pg.execute(
            "INSERT INTO ops.backfill_progress (root_run_id, asset, day, rows_written, snapshot_lsn, finished_at) "
            "VALUES (%s, 'maintenance-test', current_date, 0, 0, now() - %s)",
            (f"maintenance-{label}", age),
        )
    parked = {}
    for label, resolved in (("resolved-old", policy.resolved_dlq + timedelta(days=1)), ("unresolved-old", None)):
        parked[label] = pg.execute(
            "INSERT INTO ops.dlq_parked (target, source_topic, source_partition, source_offset, error_class, "
            "error_message, attempts, first_failure_at, parked_at, resolved_at) VALUES ('clickhouse', "
            "'maintenance-test', 0, %s, 'x', 'y', 5, now() - interval '400 days', now() - interval '400 days', "
            "now() - %s::interval) RETURNING id",
            (len(parked), resolved),
        ).fetchone()[0]  # type: ignore[index]

    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        report = run_maintenance(conn, {"clickhouse": ch, "elasticsearch": es}, policy)
    assert report.pruned["ops.reconcile_runs"] >= 1 and report.pruned["ops.backfill_progress"] >= 1
    runs = {r[0] for r in pg.execute("SELECT id FROM ops.reconcile_runs WHERE id = ANY(%s)", (list(ids.values()),))}
    assert runs == {ids["new"]}
    diffs = {
        r[0]
        for r in pg.execute(
            "SELECT reconcile_id FROM ops.reconcile_diffs WHERE reconcile_id = ANY(%s)", (list(ids.values()),)
        )
    }
    assert diffs == {ids["new"]}
    progress = {
        r[0] for r in pg.execute("SELECT root_run_id FROM ops.backfill_progress WHERE asset = 'maintenance-test'")
    }
    assert progress == {"maintenance-new"}
    kept = {r[0] for r in pg.execute("SELECT id FROM ops.dlq_parked WHERE source_topic = 'maintenance-test'")}
    assert kept == {parked["unresolved-old"]}, "an unresolved parked record is never pruned"
    pg.execute("DELETE FROM ops.dlq_parked WHERE source_topic = 'maintenance-test'")
    pg.execute("DELETE FROM ops.backfill_progress WHERE asset = 'maintenance-test'")


def test_storage_checks_record_rows_tombstones_and_bytes_of_every_mirror_and_index(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    import dagster as dg

    from knowton_pipeline.definitions import defs
    from knowton_pipeline.defs.resources import build_resources

    # At least one User tombstone in each store, so the WARN below has something to see.
    pg.execute('DELETE FROM "User" WHERE address = %s', (insert_user(pg),))
    apply()
    with dg.instance_for_test() as instance:
        result = (
            defs()
            .resolve_job_def("health_checks")
            .execute_in_process(
                resources=build_resources(),
                instance=instance,
                raise_on_error=False,
                # Any tombstone at all is too many: every pair that stores one must WARN, the others pass.
                run_config={"ops": {"storage": {"config": {"warn_tombstone_share": 0.0}}}},
            )
        )
    storage = {
        e.event_specific_data.asset_key.to_user_string(): e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == "storage"
    }
    assert set(storage) == {
        "clickhouse/knowton/users",
        "clickhouse/knowton/contents",
        "clickhouse/knowton/purchases",
        "elasticsearch/knowton-users",
        "elasticsearch/knowton-contents",
    }
    users = storage["clickhouse/knowton/users"].metadata
    live = ch.query("SELECT count() FROM knowton.users FINAL WHERE is_deleted = 0").result_rows[0][0]
    assert users["stored_rows"].value >= live + users["tombstones"].value
    assert users["bytes"].value > 0
    documents = storage["elasticsearch/knowton-users"].metadata
    tombstones = es.count(index="knowton-users-v*", query={"term": {"is_deleted": True}})["count"]
    assert documents["tombstones"].value == tombstones and documents["bytes"].value > 0
    assert 0 <= documents["tombstone_share"].value <= 1
    assert users["tombstones"].value >= 1 and documents["tombstones"].value >= 1
    for key, evaluation in storage.items():
        held = evaluation.metadata["tombstones"].value
        assert evaluation.passed == (held == 0), (key, held)
        assert evaluation.severity == dg.AssetCheckSeverity.WARN, "piled-up tombstones warn, they do not fail"


def test_the_maintenance_job_runs_from_dagster_and_reports_what_it_removed(
    horizon_restored: None, pg: psycopg.Connection
) -> None:
    import dagster as dg

    from knowton_pipeline.definitions import defs
    from knowton_pipeline.defs.resources import build_resources

    with dg.instance_for_test() as instance:
        # Finished runs in the instance's history: a sensor-launched apply (pruned past its age), a reconciliation
        # (kept: its events are check history) and an apply still running (kept: not finished).
        def run(job: str, status: dg.DagsterRunStatus) -> str:
            return instance.add_run(dg.DagsterRun(job_name=job, run_id=str(uuid.uuid4()), status=status)).run_id

        old_apply = run("apply_cdc", dg.DagsterRunStatus.SUCCESS)
        old_reconcile = run("reconcile", dg.DagsterRunStatus.SUCCESS)
        running_apply = run("apply_cdc", dg.DagsterRunStatus.STARTED)
        time.sleep(1.5)  # older than the run history age configured below (one second)
        result = (
            defs()
            .resolve_job_def("maintenance")
            .execute_in_process(
                resources=build_resources(),
                instance=instance,
                run_config={"ops": {"maintain": {"config": {"run_history_days": 1 / 86400}}}},
            )
        )
        assert result.success
        [materialization] = [e.event_specific_data for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        metadata = materialization.metadata
        assert instance.get_run_by_id(old_apply) is None, "an old finished apply run is deleted"
        assert instance.get_run_by_id(old_reconcile) is not None, "a run that evaluated checks is kept"
        assert instance.get_run_by_id(running_apply) is not None, "a run not finished is kept"
        assert instance.get_run_by_id(result.run_id) is not None, "the maintenance run keeps itself"
        assert metadata["dagster_runs_deleted"].value >= 1
    assert {"purge_horizon", "tombstones_purged_clickhouse", "tombstones_purged_elasticsearch"} <= set(metadata)
    assert {"pruned_reconcile_runs", "pruned_backfill_progress", "pruned_dlq_parked", "dagster_runs_deleted"} <= set(
        metadata
    )
    noted = pg.execute("SELECT count(*) FROM ops.wal_marks WHERE noted_at > now() - interval '5 minutes'").fetchone()
    assert noted is not None and noted[0] >= 1, "the run noted the WAL position that ages future deletes"
