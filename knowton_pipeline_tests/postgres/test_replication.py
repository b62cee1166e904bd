"""Replication checks and the check-failure alerts against the real stack: a slot left inactive while
writes continue turns the lag check WARN then ERROR; a failing check alerts once, then recovers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from knowton_pipeline.catalog import HEARTBEAT
from knowton_pipeline.defs.alerts.sensors import check_failure_alert_sensor
from knowton_pipeline.defs.kafka_connect.assets import CDC_CONNECTOR
from knowton_pipeline.defs.postgres.assets import postgres_table_spec
from knowton_pipeline.defs.postgres.replication import (
    ReplicationThresholds,
    replication_health,
    replication_lag_sensor,
)
from knowton_pipeline.defs.resources import AlertsResource, build_resources
from knowton_pipeline.lib.health.replication import applied_heartbeat
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats, sink_group
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import Receiver, insert_user, wait_for

SEARCH_LAG = "end_to_end_lag_elasticsearch"
CLICKHOUSE_LAG = "end_to_end_lag_clickhouse"


def _definitions(only: tuple[str, ...] = (), **thresholds: Any) -> dg.Definitions:
    heartbeat = postgres_table_spec(HEARTBEAT)
    selection = (
        dg.AssetSelection.checks(*(dg.AssetCheckKey(heartbeat.key, name) for name in only))
        if only
        else dg.AssetSelection.checks(replication_health)
    )
    return dg.Definitions(
        assets=[heartbeat],
        asset_checks=[replication_health],
        jobs=[dg.define_asset_job("replication_checks", selection=selection)],
        resources={**build_resources(), "replication_thresholds": ReplicationThresholds(**thresholds)},
    )


def run_checks(instance: dg.DagsterInstance, only: tuple[str, ...] = (), **thresholds: Any) -> dict[str, Any]:
    result = (
        _definitions(only, **thresholds).resolve_job_def("replication_checks").execute_in_process(instance=instance)
    )
    assert result.success
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return {e.check_name: e for e in evaluations}


def _record_timestamp(settings: Settings, offset: int) -> datetime:
    config = {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "knowton-test-reader"}
    consumer = Consumer({**config, "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(HEARTBEAT.topic, 0, offset)])

        def record() -> Any:
            msg = consumer.poll(0.5)
            return msg if msg is not None and not msg.error() else None

        msg = wait_for(record, timeout=30, interval=0.0, what=f"heartbeat record {offset}")
        return datetime.fromtimestamp(msg.timestamp()[1] / 1000, UTC)
    finally:
        consumer.close()


def test_the_applied_heartbeat_is_the_committed_records_timestamp_read_without_a_fetch(
    stack: Stack, settings: Settings, apply: Callable[[], ApplyStats], pg: psycopg.Connection
) -> None:
    pg.execute("UPDATE ops.heartbeat SET ts = now() WHERE id = 1")  # a heartbeat for this apply to commit
    apply()
    group = sink_group("elasticsearch")
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        [committed] = consumer.committed([TopicPartition(HEARTBEAT.topic, 0)], timeout=10)
    finally:
        consumer.close()
    newest = _record_timestamp(settings, committed.offset - 1)
    assert committed.metadata == f"ts={round(newest.timestamp() * 1000)}"  # stored by the apply's commit
    assert applied_heartbeat(settings.kafka_bootstrap, group_id=group) == newest

    # An offset committed without the timestamp (by an older apply, say) is read back from the record.
    group = f"knowton-test-{uuid.uuid4().hex[:8]}"
    legacy = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        legacy.commit(offsets=[TopicPartition(HEARTBEAT.topic, 0, committed.offset)], asynchronous=False)
    finally:
        legacy.close()
    try:
        assert applied_heartbeat(settings.kafka_bootstrap, group_id=group) == newest
    finally:
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            future.result()


def _verdict(evaluation: Any) -> str:
    return "ok" if evaluation.passed else evaluation.severity.value.lower()


def test_an_inactive_slot_with_writes_going_on_turns_the_lag_check_warn_then_error(
    stack: Stack, settings: Settings, apply: Callable[[], ApplyStats], pg: psycopg.Connection
) -> None:
    thresholds = {"lag_warn_seconds": 12.0, "lag_error_seconds": 20.0}
    with dg.instance_for_test() as instance:
        apply()
        healthy = run_checks(instance, **thresholds)
        assert _verdict(healthy["replication_slot"]) == "ok" and healthy["replication_slot"].metadata["active"].value
        assert _verdict(healthy[SEARCH_LAG]) == "ok" and _verdict(healthy[CLICKHOUSE_LAG]) == "ok"
        stopped = time.monotonic()
        stack.down(["connect"])
        try:
            seen: list[str] = []
            seen_by_clickhouse: list[str] = []  # nothing reaches either store
            while time.monotonic() - stopped < 40 and not ("error" in seen and "error" in seen_by_clickhouse):
                insert_user(pg)  # writes go on while nothing reads the slot
                checks = run_checks(instance, **thresholds)
                seen.append(_verdict(checks[SEARCH_LAG]))
                seen_by_clickhouse.append(_verdict(checks[CLICKHOUSE_LAG]))
                assert _verdict(checks["replication_slot"]) == "warn"  # inactive
                assert checks["replication_slot"].metadata["active"].value is False
                time.sleep(2)
            # Once through WARN, then ERROR, never back: for each store.
            for verdicts in (seen, seen_by_clickhouse):
                assert "warn" in verdicts and verdicts[-1] == "error", verdicts
                assert (
                    verdicts.index("warn") < verdicts.index("error") and "ok" not in verdicts[verdicts.index("warn") :]
                )
        finally:
            stack.up(["connect"])
        client = KafkaConnectClient(settings.connect_url)
        wait_for(
            lambda: (client.status(CDC_CONNECTOR) or {}).get("connector", {}).get("state") == "RUNNING", timeout=120
        )
        wait_for(
            lambda: pg.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot'"
            ).fetchone()[0],  # type: ignore[index]
            timeout=120,
            what="the slot active again",
        )
        apply()
        recovered = run_checks(instance, **thresholds)
        assert {n: _verdict(e) for n, e in recovered.items()} == {
            "replication_slot": "ok",
            SEARCH_LAG: "ok",
            CLICKHOUSE_LAG: "ok",
            "idle_transactions": "ok",
        }


def test_a_failing_check_alerts_once_within_the_throttle_window_and_recovers(stack: Stack, receiver: Receiver) -> None:
    failing = {"lag_warn_seconds": 0.0, "lag_error_seconds": 0.0}  # any lag at all is an ERROR
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> str | None:
            context = dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                definitions=_definitions(),
                resources={"alerts": AlertsResource(throttle_seconds=600, webhook_url=receiver.url)},
            )
            return check_failure_alert_sensor(context).cursor  # type: ignore[union-attr]

        cursor = tick(None)
        assert receiver.received == []
        run_checks(instance, (SEARCH_LAG,), **failing)
        cursor = tick(cursor)
        assert len(receiver.received) == 1
        alert = receiver.received[0]
        assert "Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat failed" in alert["text"]
        assert alert["attachments"][0]["color"] == "#d0021b"  # an ERROR, not a WARN
        assert any(f["title"] == "lag_seconds" for f in alert["attachments"][0]["fields"])
        run_checks(instance, (SEARCH_LAG,), **failing)
        cursor = tick(cursor)
        assert len(receiver.received) == 1  # still failing: no second alert
        run_checks(instance, (SEARCH_LAG,), lag_warn_seconds=3600.0, lag_error_seconds=7200.0)
        cursor = tick(cursor)
        assert len(receiver.received) == 2
        assert receiver.received[1]["text"].endswith(
            "Recovered: Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat"
        )
        tick(cursor)
        assert len(receiver.received) == 2  # nothing new evaluated: nothing sent


def test_a_check_failing_again_soon_after_its_recovery_is_alerted_when_the_window_ends(
    stack: Stack, receiver: Receiver
) -> None:
    throttle = 30.0
    failing = {"lag_warn_seconds": 0.0, "lag_error_seconds": 0.0}  # any lag at all is an ERROR
    passing = {"lag_warn_seconds": 3600.0, "lag_error_seconds": 7200.0}
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> str | None:
            context = dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                definitions=_definitions(),
                resources={"alerts": AlertsResource(throttle_seconds=throttle, webhook_url=receiver.url)},
            )
            return check_failure_alert_sensor(context).cursor  # type: ignore[union-attr]

        cursor = tick(None)
        run_checks(instance, (SEARCH_LAG,), **failing)
        cursor = tick(cursor)
        run_checks(instance, (SEARCH_LAG,), **passing)
        cursor = tick(cursor)
        recovered_at = time.monotonic()
        assert [t.split(" ", 1)[1] for t in receiver.texts()] == [
            "Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat failed",
            "Recovered: Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat",
        ]
        run_checks(instance, (SEARCH_LAG,), **failing)
        cursor = tick(cursor)
        assert time.monotonic() - recovered_at < throttle, "too slow to test within the throttle window"
        assert len(receiver.received) == 2  # held back: a message went out less than a window ago
        time.sleep(max(0.0, recovered_at + throttle - time.monotonic()) + 1.0)
        tick(cursor)  # no new evaluation: the check still fails, and the window has ended
        assert len(receiver.received) == 3
        assert receiver.texts()[2].endswith("Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat failed")


def test_a_caught_up_sink_records_its_stores_assets_as_up_to_date_once_a_minute(
    stack: Stack, apply: Callable[[], ApplyStats], pg: psycopg.Connection
) -> None:
    pg.execute("UPDATE ops.heartbeat SET ts = now() WHERE id = 1")
    apply()
    resources = {**build_resources(), "replication_thresholds": ReplicationThresholds()}
    with dg.instance_for_test() as instance:
        tick = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        done = [e for e in tick.asset_events if isinstance(e, dg.AssetMaterialization)]  # type: ignore[union-attr]
        keys = {e.asset_key.to_user_string(): e for e in done}
        # Every mirror and index, each attributed to its store's sink, with how far behind that sink was.
        assert set(keys) == {
            "clickhouse/knowton/users",
            "clickhouse/knowton/contents",
            "clickhouse/knowton/purchases",
            "elasticsearch/knowton-users",
            "elasticsearch/knowton-contents",
        }
        for key, event in keys.items():
            store = key.split("/")[0]
            assert event.metadata["sink_group"].value == f"knowton-sink-{store}"  # type: ignore[attr-defined]
            assert 0 <= event.metadata["lag_seconds"].value < 30  # type: ignore[attr-defined]
        again = replication_lag_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=tick.cursor)  # type: ignore[union-attr]
        )
        assert not [e for e in again.asset_events if isinstance(e, dg.AssetMaterialization)]  # type: ignore[union-attr]
    # A sink behind its limit brings nothing up to date: with any lag at all an ERROR, nothing is recorded.
    strict = {
        **build_resources(),
        "replication_thresholds": ReplicationThresholds(lag_warn_seconds=0.0, lag_error_seconds=0.0),
    }
    with dg.instance_for_test() as instance:
        late = replication_lag_sensor(dg.build_sensor_context(instance=instance, resources=strict))
        assert not [e for e in late.asset_events if isinstance(e, dg.AssetMaterialization)]  # type: ignore[union-attr]
