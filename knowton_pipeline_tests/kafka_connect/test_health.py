"""connector_health_sensor against the real Kafka Connect, with alerts delivered to a real HTTP receiver
(which may refuse them), a worker killed outright mid-stream among them; its restart/backoff/alert decisions on
failed, deleted and redeployed connectors; restart_failed_connectors on the real worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from elasticsearch import Elasticsearch

from knowton_pipeline.defs.kafka_connect.assets import CDC_CONNECTOR
from knowton_pipeline.defs.kafka_connect.health import (
    ConnectorHealthCursor,
    ConnectorHealthPolicy,
    connector_health_sensor,
    evaluate,
    restart_failed_connectors,
)
from knowton_pipeline.defs.resources import AlertsResource, KafkaConnectResource, build_resources
from knowton_pipeline.lib.health.connect import ConnectHealth, ConnectorHealth, TaskState
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import (
    Receiver,
    assert_reconciled,
    ch_row,
    es_source,
    insert_user,
    topic_size,
    wait_for,
)


def tick(settings: Settings, receiver: Receiver, cursor: str | None, **policy: Any) -> tuple[dg.SensorResult, float]:
    context = dg.build_sensor_context(
        cursor=cursor,
        resources={
            "kafka_connect": KafkaConnectResource(url=settings.connect_url),
            "alerts": AlertsResource(throttle_seconds=600, webhook_url=receiver.url),
            "connector_health_policy": ConnectorHealthPolicy(**policy),
        },
    )
    t0 = time.monotonic()
    result = connector_health_sensor(context)
    return result, time.monotonic() - t0  # type: ignore[return-value]


def test_a_healthy_tick_is_fast_records_states_and_requests_nothing(
    stack: Stack, settings: Settings, receiver: Receiver
) -> None:
    result, seconds = tick(settings, receiver, None)
    assert seconds < 1.0
    assert not result.run_requests and receiver.received == []
    states = {e.asset_key.to_user_string(): e.metadata for e in result.asset_events}
    assert "kafka/topics/cdc-User" in states
    assert states["kafka/topics/cdc-User"]["connector_state"].value == "RUNNING"
    assert states["kafka/topics/cdc-User"]["tasks_running"].value == 1
    cursor = json.loads(result.cursor or "{}")
    assert cursor["connectors"][CDC_CONNECTOR]["attempts"] == 0 and cursor["unreachable_ticks"] == 0
    # Unchanged states are not observed again on the next tick.
    again, _ = tick(settings, receiver, result.cursor)
    assert again.asset_events == []


def test_a_connect_worker_killed_mid_stream_alerts_once_recovers_and_loses_no_change(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    stack: Stack,
    settings: Settings,
    receiver: Receiver,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    """The worker is SIGKILLed (no flush, no clean shutdown) while rows are written. The sensor alerts once, on
    the configured tick, and recovers when the worker is back; Debezium resumes from the offsets Connect last
    flushed and the slot, so every change reaches both stores (some perhaps twice: harmless, writes are
    versioned) and nothing goes to a DLQ."""
    dlq_before = {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()}
    written: list[str] = []
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                written.append(insert_user(conn))
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    cursor = None
    try:
        time.sleep(2)
        record = stack.record(stack.components["connect"])
        assert record is not None
        os.killpg(record.pid, signal.SIGKILL)
        wait_for(lambda: stack.record(stack.components["connect"]) is None, timeout=30, what="the worker gone")
        for expected in (0, 1, 1):  # alert on the second tick, and only once
            result, seconds = tick(settings, receiver, cursor, unreachable_ticks=2, request_timeout_seconds=2.0)
            cursor = result.cursor
            assert seconds < 2.0 + 1.0  # bounded by the request timeout
            assert len(receiver.received) == expected
            time.sleep(1)  # writes go on while no worker reads the slot
        assert "Kafka Connect is unreachable" in receiver.texts()[0]
        stack.up(["connect"])
        client = KafkaConnectClient(settings.connect_url)
        wait_for(
            lambda: (
                (st := client.status(CDC_CONNECTOR) or {}).get("connector", {}).get("state") == "RUNNING"
                and all(t["state"] == "RUNNING" for t in st.get("tasks", []))
            ),
            timeout=120,
            what="the connector and its task RUNNING again",
        )
        time.sleep(2)
    finally:
        stop.set()
        writer.join()
        if stack.record(stack.components["connect"]) is None:
            stack.up(["connect"])
    result, _ = tick(settings, receiver, cursor, unreachable_ticks=2)
    assert len(receiver.received) == 2 and receiver.texts()[1].endswith("Recovered: Kafka Connect is unreachable")
    apply()
    assert len(written) > 50
    for address in written:
        assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None, address
        assert es_source(es, "knowton-users", address) is not None, address
    assert_reconciled(settings, ch, es, "User", written)
    assert {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()} == dlq_before


def _failed(trace: str = "org.postgresql.util.PSQLException: FATAL: role is not permitted to log in") -> ConnectHealth:
    task = TaskState(0, "FAILED", "127.0.0.1:8083", trace)
    return ConnectHealth(True, None, {CDC_CONNECTOR: ConnectorHealth(CDC_CONNECTOR, "RUNNING", [task])})


def test_failed_tasks_are_restarted_with_capped_exponential_backoff_then_alerted() -> None:
    policy = ConnectorHealthPolicy(max_restarts=3, backoff_seconds=10)
    state = ConnectorHealthCursor()
    requested, alerts = [], []
    for now in (0, 1, 10, 15, 30, 69, 70, 500, 501):
        runs, sent, _ = evaluate(_failed(), state, policy, float(now), throttle_seconds=600)
        requested += [(now, r.run_config["ops"]["restart_connectors"]["config"]["connectors"]) for r in runs]
        alerts += [(now, a.severity, a.title, a.text) for a in sent]
    # Attempts at 0, 10 (after 10 s), 30 (after 20 s); the fourth would be due at 70 but the cap is 3.
    assert [t for t, _ in requested] == [0, 10, 30]
    assert all(names == [CDC_CONNECTOR] for _, names in requested)
    entry = state.connectors[CDC_CONNECTOR]
    assert entry.attempts == 3 and "not permitted to log in" in (entry.last_trace or "")
    assert [(t, s) for t, s, _, _ in alerts] == [(70, "error")]  # once, when the last backoff ran out
    assert "still FAILED after 3 restart(s)" in alerts[0][2]
    assert alerts[0][3].startswith("org.postgresql.util.PSQLException: FATAL: role is not permitted to log in")
    _, sent, _ = evaluate(_healthy(), state, policy, 600.0, throttle_seconds=600)
    assert [a.severity for a in sent] == ["recovery"]
    # The attempts count from zero once it has stayed RUNNING for healthy_seconds (60 by default).
    evaluate(_healthy(), state, policy, 630.0, throttle_seconds=600)
    assert state.connectors[CDC_CONNECTOR].attempts == 3
    evaluate(_healthy(), state, policy, 660.0, throttle_seconds=600)
    assert state.connectors[CDC_CONNECTOR].attempts == 0


def test_a_healed_connector_reports_its_time_to_heal_on_the_topic_assets() -> None:
    policy = ConnectorHealthPolicy(max_restarts=3, backoff_seconds=10)
    state = ConnectorHealthCursor()
    _, _, first = evaluate(_failed(), state, policy, 100.0, throttle_seconds=600)
    assert first and all("time_to_heal_seconds" not in o.metadata for o in first)
    evaluate(_failed(), state, policy, 130.0, throttle_seconds=600)  # still failed: the incident began at 100
    _, _, healed = evaluate(_healthy(), state, policy, 175.0, throttle_seconds=600)
    assert healed and {o.metadata["time_to_heal_seconds"].value for o in healed} == {75.0}
    _, _, later = evaluate(_healthy(), state, policy, 400.0, throttle_seconds=600)
    assert all("time_to_heal_seconds" not in o.metadata for o in later), "reported once, when it healed"


def test_a_task_that_runs_briefly_between_failures_still_reaches_the_cap_and_alerts() -> None:
    """A persisting fault: each restart runs for a few seconds, and a tick may land in one of them."""
    policy = ConnectorHealthPolicy(max_restarts=3, backoff_seconds=10)
    state = ConnectorHealthCursor()
    requested, alerts = 0, []
    for now, health in [(0, _failed()), (12, _healthy()), (15, _failed()), (31, _healthy()), (40, _failed())]:
        runs, sent, _ = evaluate(health, state, policy, float(now), throttle_seconds=600)
        requested += len(runs)
        alerts += [(now, a.severity) for a in sent]
    assert requested == 3 and state.connectors[CDC_CONNECTOR].attempts == 3
    runs, sent, _ = evaluate(_failed(), state, policy, 80.0, throttle_seconds=600)  # the last backoff ran out
    assert runs == [] and [a.severity for a in sent] == ["error"]


def _healthy() -> ConnectHealth:
    return ConnectHealth(
        True, None, {CDC_CONNECTOR: ConnectorHealth(CDC_CONNECTOR, "RUNNING", [TaskState(0, "RUNNING")])}
    )


def test_restart_failed_connectors_job_restarts_on_the_real_worker(stack: Stack) -> None:
    result = restart_failed_connectors.execute_in_process(
        run_config={"ops": {"restart_connectors": {"config": {"connectors": [CDC_CONNECTOR], "wait_seconds": 60}}}},
        resources=build_resources(),
    )
    assert result.success
    assert result.output_for_node("restart_connectors") == {CDC_CONNECTOR: "RUNNING"}


@contextmanager
def topic_refuses_records(settings: Settings, topic: str) -> Iterator[None]:
    """A broker-side fault Connect cannot retry: the topic accepts no message over 64 bytes, so Debezium's
    producer gets RecordTooLargeException and the task FAILS. Undone on exit, whatever happens."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})

    def alter(op: AlterConfigOpType, value: str) -> None:
        entry = ConfigEntry("max.message.bytes", value, incremental_operation=op)
        for future in admin.incremental_alter_configs(
            [ConfigResource("topic", topic, incremental_configs=[entry])]
        ).values():
            future.result(timeout=30)

    alter(AlterConfigOpType.SET, "64")
    try:
        yield
    finally:
        alter(AlterConfigOpType.DELETE, "")


def _task_state(client: KafkaConnectClient) -> str | None:
    status = client.status(CDC_CONNECTOR) or {}
    tasks = status.get("tasks") or [{}]
    return tasks[0].get("state")


def _restart(request: dg.RunRequest, **config: Any) -> dg.ExecuteInProcessResult:
    run_config = request.run_config
    run_config["ops"]["restart_connectors"]["config"].update(config)
    return restart_failed_connectors.execute_in_process(
        run_config=run_config, resources=build_resources(), raise_on_error=False
    )


def test_a_failed_debezium_task_is_restarted_by_the_sensor_and_no_change_is_lost(
    stack: Stack,
    settings: Settings,
    receiver: Receiver,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
    apply: Callable[[], ApplyStats],
) -> None:
    client = KafkaConnectClient(settings.connect_url)
    policy = {"backoff_seconds": 1.0, "max_restarts": 3, "healthy_seconds": 3.0}
    kept, deleted = insert_user(pg, reputation=1), insert_user(pg)
    apply()
    assert ch_row(ch, "users", "address = {a:String}", {"a": deleted}) is not None
    first, _ = tick(settings, receiver, None, **policy)
    cursor = first.cursor
    inserted: list[str] = []
    with topic_refuses_records(settings, "cdc-User"):

        def write_until_failed() -> bool:  # a write now and then, in case the broker took the config late
            inserted.append(insert_user(pg))
            return _task_state(client) == "FAILED"

        wait_for(write_until_failed, timeout=90, interval=3.0, what="the Debezium task to FAIL")
        # Changes keep coming while the task is down: an insert, an update, a delete.
        inserted.append(insert_user(pg))
        pg.execute('UPDATE "User" SET reputation = 42 WHERE address = %s', (kept,))
        pg.execute('DELETE FROM "User" WHERE address = %s', (deleted,))

        result, seconds = tick(settings, receiver, cursor, **policy)
        cursor = result.cursor
        assert seconds < 1.0
        assert [r.run_config["ops"]["restart_connectors"]["config"]["connectors"] for r in result.run_requests] == [
            [CDC_CONNECTOR]
        ]
        entry = json.loads(cursor or "{}")["connectors"][CDC_CONNECTOR]
        assert entry["attempts"] == 1 and "RecordTooLargeException" in entry["last_trace"]
        assert entry["last_cause"].startswith("org.apache.kafka.common.errors.RecordTooLargeException")
        states = {e.asset_key.to_user_string(): e.metadata for e in result.asset_events}
        assert states["kafka/topics/cdc-User"]["tasks_failed"].value == 1

        # While the fault lasts a restart does not hold, and the run says so rather than reporting RUNNING.
        held = _restart(result.run_requests[0], wait_seconds=90, stable_seconds=20)
        assert not held.success
        failure = held.failure_data_for_node("restart_connectors")
        reason = failure.user_failure_data.description if failure and failure.user_failure_data else ""
        assert reason.startswith("restart did not hold") and "RecordTooLargeException" in reason
        wait_for(lambda: _task_state(client) == "FAILED", timeout=60, what="the task to be FAILED again")
        time.sleep(1.5)  # the 1 s backoff before the second attempt
        result, _ = tick(settings, receiver, cursor, **policy)
        cursor = result.cursor
        assert len(result.run_requests) == 1
        assert json.loads(cursor or "{}")["connectors"][CDC_CONNECTOR]["attempts"] == 2

    # The fault is gone: the sensor's second restart holds.
    healed = _restart(result.run_requests[0], wait_seconds=90, stable_seconds=10)
    assert healed.success and healed.output_for_node("restart_connectors") == {CDC_CONNECTOR: "RUNNING"}
    result, _ = tick(settings, receiver, cursor, **policy)
    assert not result.run_requests
    states = {e.asset_key.to_user_string(): e.metadata for e in result.asset_events}
    # The attempts count from zero once it has stayed RUNNING for healthy_seconds.
    assert json.loads(result.cursor or "{}")["connectors"][CDC_CONNECTOR]["attempts"] == 2
    time.sleep(3.5)
    again, _ = tick(settings, receiver, result.cursor, **policy)
    assert json.loads(again.cursor or "{}")["connectors"][CDC_CONNECTOR]["attempts"] == 0
    assert states["kafka/topics/cdc-User"]["connector_state"].value == "RUNNING"
    assert states["kafka/topics/cdc-User"]["tasks_running"].value == 1
    assert receiver.received == []  # restarts within the cap are not alerts

    # Debezium resumed from the last offset it had flushed: every change made during the outage is in both stores.
    apply()
    for address in inserted:
        row, doc = ch_row(ch, "users", "address = {a:String}", {"a": address}), es_source(es, "knowton-users", address)
        assert row is not None and row["is_deleted"] == 0
        assert doc is not None and doc["is_deleted"] is False
    row, doc = ch_row(ch, "users", "address = {a:String}", {"a": kept}), es_source(es, "knowton-users", kept)
    assert row is not None and row["reputation"] == 42 and doc is not None and doc["reputation"] == 42
    assert ch_row(ch, "users", "address = {a:String}", {"a": deleted}) is None  # FINAL hides the delete
    gone = es_source(es, "knowton-users", deleted)
    assert gone is not None and gone["is_deleted"] is True


def _closed_port() -> int:
    """A port nothing listens on: Connect there is really unreachable (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_alert_the_webhook_failed_to_take_is_not_recorded_and_the_next_tick_sends_it(receiver: Receiver) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"

    def unreachable_tick(cursor: str | None) -> str | None:
        context = dg.build_sensor_context(
            cursor=cursor,
            resources={
                "kafka_connect": KafkaConnectResource(url=url),
                "alerts": AlertsResource(throttle_seconds=600, webhook_url=receiver.url),
                "connector_health_policy": ConnectorHealthPolicy(unreachable_ticks=1, request_timeout_seconds=1.0),
            },
        )
        return connector_health_sensor(context).cursor  # type: ignore[union-attr]

    receiver.fail_with(503)
    cursor = unreachable_tick(None)
    assert len(receiver.attempts) == 3 and receiver.received == []  # retried, bounded, then given up
    assert json.loads(cursor or "{}")["alerts"]["connect:unreachable"]["alerted"] is False
    receiver.heal()
    cursor = unreachable_tick(cursor)
    assert receiver.texts() == [":red_circle: Kafka Connect is unreachable"]
    unreachable_tick(cursor)
    assert len(receiver.received) == 1  # delivered once: recorded, not sent again


def _one(health: ConnectorHealth) -> ConnectHealth:
    return ConnectHealth(True, None, {health.name: health})


def test_a_connector_deleted_and_deployed_again_starts_from_a_fresh_entry() -> None:
    policy = ConnectorHealthPolicy(max_restarts=2, backoff_seconds=100)
    failed = ConnectorHealth("scratch", "RUNNING", [TaskState(0, "FAILED", None, "java.lang.IllegalStateException")])
    state = ConnectorHealthCursor()
    for now in (0.0, 100.0, 300.0):  # two restarts, then alerted when the second backoff ran out
        evaluate(_one(failed), state, policy, now, throttle_seconds=600)
    assert state.connectors["scratch"].attempts == 2 and "connector:scratch:failed" in state.alerts
    # Deleted: its entry and its alert go, the alert with an ending message.
    _, sent, _ = evaluate(ConnectHealth(True, None, {}), state, policy, 310.0, throttle_seconds=600)
    assert "scratch" not in state.connectors and "connector:scratch:failed" not in state.alerts
    assert [a.title for a in sent] == ["Ended: connector scratch was deleted from Kafka Connect"]
    # Deployed again, failing at once: restarted at once, attempts counted from one, no old backoff.
    runs, sent, _ = evaluate(_one(failed), state, policy, 320.0, throttle_seconds=600)
    assert [r.tags["knowton/restart-attempt"] for r in runs] == ["1"] and sent == []
    assert state.connectors["scratch"].attempts == 1


def test_a_connector_deployed_again_with_another_config_between_two_ticks_starts_afresh() -> None:
    policy = ConnectorHealthPolicy(max_restarts=1, backoff_seconds=100)
    trace = "java.lang.IllegalStateException"
    old = ConnectorHealth("scratch", "RUNNING", [TaskState(0, "FAILED", None, trace)], config_digest="a")
    state = ConnectorHealthCursor()
    for now in (0.0, 100.0):
        runs, sent, _ = evaluate(_one(old), state, policy, now, throttle_seconds=600)
    assert runs == [] and [a.severity for a in sent] == ["error"]  # restarts ran out: alerted
    new = ConnectorHealth("scratch", "RUNNING", [TaskState(0, "FAILED", None, trace)], config_digest="b")
    runs, sent, _ = evaluate(_one(new), state, policy, 110.0, throttle_seconds=600)
    assert [r.tags["knowton/restart-attempt"] for r in runs] == ["1"]
    assert [a.title for a in sent] == ["Ended: connector scratch was deployed again with another config"]
    assert state.connectors["scratch"].attempts == 1 and state.connectors["scratch"].config_digest == "b"
