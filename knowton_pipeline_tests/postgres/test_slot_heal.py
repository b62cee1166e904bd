"""The replication slot dropped under a running connector: the next sensor tick launches `heal_replication`,
which brings CDC back and re-syncs what was committed while it was down, inserts, updates and deletes alike,
with no step a person would take."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.postgres.replication import ReplicationThresholds, replication_lag_sensor
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.health.replication import SLOT
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import (
    CDC_CONNECTOR,
    assert_reconciled,
    ch_row,
    es_source,
    insert_user,
    wait_for,
)


def _drop_slot(pg: psycopg.Connection) -> None:
    """As a failover or a hand does: the walsender is cut and the slot dropped before Debezium reconnects."""

    def dropped() -> bool:
        pg.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
        try:
            pg.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
        except psycopg.errors.ObjectInUse:
            return False
        return True

    wait_for(dropped, timeout=30, interval=0.2, what=f"{SLOT} dropped")


def test_a_dropped_slot_is_healed_and_the_changes_made_meanwhile_reach_both_stores(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    updated, deleted = insert_user(pg, reputation=1), insert_user(pg)
    apply()
    _drop_slot(pg)
    # Committed while CDC is down: none of it will ever be streamed.
    inserted = insert_user(pg)
    pg.execute('UPDATE "User" SET reputation = 99 WHERE address = %s', (updated,))
    pg.execute('DELETE FROM "User" WHERE address = %s', (deleted,))

    resources = {**build_resources(), "replication_thresholds": ReplicationThresholds()}
    with dg.instance_for_test() as instance:
        tick = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        [request] = tick.run_requests  # type: ignore[union-attr]
        healed = (
            defs()
            .resolve_job_def("heal_replication")
            .execute_in_process(run_config=request.run_config, instance=instance, resources=build_resources())
        )
    assert healed.success
    [output] = [e.event_specific_data for e in healed.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert output.metadata["healed"].value is True and output.metadata["keys_resynced"].value >= 3
    assert output.metadata["time_to_heal_seconds"].value > 0

    connect = KafkaConnectClient(settings.connect_url)
    status = connect.status(CDC_CONNECTOR) or {}
    assert status["connector"]["state"] == "RUNNING" and [t["state"] for t in status["tasks"]] == ["RUNNING"]
    assert (connect.config(CDC_CONNECTOR) or {})["snapshot.mode"] == "initial", "the configured mode is back"
    # The gap reached both stores...
    assert ch_row(ch, "users", "address = {a:String}", {"a": inserted}) is not None
    assert ch_row(ch, "users", "address = {a:String}", {"a": updated})["reputation"] == 99  # type: ignore[index]
    assert ch_row(ch, "users", "address = {a:String}", {"a": deleted}) is None
    es.indices.refresh(index="knowton-users")
    assert es_source(es, "knowton-users", inserted) is not None
    # ...and CDC streams again: a change after the heal arrives through Debezium and the apply.
    after = insert_user(pg)
    apply()
    assert ch_row(ch, "users", "address = {a:String}", {"a": after}) is not None
    assert_reconciled(settings, ch, es, "User", [inserted, updated, deleted, after])
    with dg.instance_for_test() as instance:
        calm = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not calm.run_requests  # type: ignore[union-attr]


def test_a_heal_interrupted_after_the_slot_came_back_is_resumed_by_the_next_tick(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg)
    apply()
    # As a heal that recreated the slot and then stopped (a timeout, a store outage) leaves things: the incident
    # open, and a change of the gap not yet re-synced (here: a mirror row gone behind the pipeline's back).
    pg.execute(
        "INSERT INTO ops.incidents (subject, detail) VALUES ('replication slot lost', 'interrupted heal') "
        "ON CONFLICT DO NOTHING"
    )
    ch.command(
        "ALTER TABLE knowton.users DELETE WHERE address = {a:String}",
        parameters={"a": address},
        settings={"mutations_sync": 2},
    )
    resources = {**build_resources(), "replication_thresholds": ReplicationThresholds()}
    with dg.instance_for_test() as instance:
        tick = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        [request] = tick.run_requests  # type: ignore[union-attr]
        assert request.tags["knowton/reason"] == "unfinished heal"
        healed = (
            defs()
            .resolve_job_def("heal_replication")
            .execute_in_process(run_config=request.run_config, instance=instance, resources=build_resources())
        )
        assert healed.success
        open_heals = pg.execute(
            "SELECT count(*) FROM ops.incidents WHERE subject = 'replication slot lost' AND closed_at IS NULL"
        ).fetchone()
        assert open_heals == (0,)
        calm = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not calm.run_requests  # type: ignore[union-attr]
    assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None
    assert_reconciled(settings, ch, es, "User", [address])
