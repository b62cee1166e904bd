"""Replication health on the PostgreSQL side: asset checks on `postgres/ops/heartbeat` (the slot, end-to-end
lag of each store's sink per topic, sessions idle in a transaction) and `replication_lag_sensor`, which records them as numbers the
UI plots and alerts when one turns to ERROR."""

import time
from typing import Any

import dagster as dg

from knowton_pipeline.catalog import HEARTBEAT, TABLES
from knowton_pipeline.defs.cursors import ReplicationCursor
from knowton_pipeline.defs.postgres.assets import postgres_table_key
from knowton_pipeline.defs.postgres.heal import HEAL_INCIDENT, HealReplicationConfig, heal_cdc, heal_replication
from knowton_pipeline.defs.resources import AlertsResource, KafkaResource, PostgresResource
from knowton_pipeline.defs.runs import run_in_flight
from knowton_pipeline.defs.store_assets import store_asset_key
from knowton_pipeline.lib.health.alerts import Alert, AlertBook, Dispatch
from knowton_pipeline.lib.health.heal import slot_lost
from knowton_pipeline.lib.health.replication import (
    IdleTransactionHealth,
    IdleTransactionThresholds,
    LagHealth,
    LagThresholds,
    SlotHealth,
    SlotThresholds,
    end_to_end_lag,
    idle_transaction_health,
    published_heartbeat,
    slot_health,
)
from knowton_pipeline.lib.reconcile.record import open_incident
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.sync.apply import sink_group

HEARTBEAT_ASSET = postgres_table_key(HEARTBEAT)
UP_TO_DATE_EVERY_SECONDS = 60  # how often a caught-up sink's assets are recorded as up to date
HEAL_RETRY_SECONDS = 300  # at most one heal_replication run per this many seconds
SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR, "ok": dg.AssetCheckSeverity.WARN}


class ReplicationThresholds(dg.ConfigurableResource):
    """WARN/ERROR thresholds of the replication checks and of replication_lag_sensor."""

    lag_warn_seconds: float = 30.0
    lag_error_seconds: float = 60.0
    retained_warn_bytes: int = 1 << 30
    retained_error_bytes: int = 8 << 30
    idle_transaction_warn_seconds: float = 60.0
    idle_transaction_error_seconds: float = 300.0

    def idle(self) -> IdleTransactionThresholds:
        return IdleTransactionThresholds(self.idle_transaction_warn_seconds, self.idle_transaction_error_seconds)

    def lag(self) -> LagThresholds:
        return LagThresholds(self.lag_warn_seconds, self.lag_error_seconds)

    def slot(self) -> SlotThresholds:
        return SlotThresholds(self.retained_warn_bytes, self.retained_error_bytes)


def _slot_metadata(s: SlotHealth) -> dict[str, Any]:
    return {
        "slot": s.slot,
        "present": s.present,
        "active": s.active,
        "wal_status": s.wal_status or "",
        "retained_wal_bytes": dg.IntMetadataValue(s.retained_bytes),
    }


def _idle_metadata(idle: IdleTransactionHealth) -> dict[str, Any]:
    return {
        "idle_transactions": dg.IntMetadataValue(len(idle.sessions)),
        "oldest_idle_transaction_seconds": dg.FloatMetadataValue(
            round(idle.sessions[0].age_seconds, 1) if idle.sessions else 0.0
        ),
        "idle_transaction_pids": dg.MetadataValue.json([s.pid for s in idle.sessions]),
    }


def lag_check_name(store: str) -> str:
    return f"end_to_end_lag_{store}"


def _lag_metadata(lag: LagHealth) -> dict[str, Any]:
    return {
        "lag_seconds": dg.FloatMetadataValue(round(lag.lag_seconds, 3) if lag.lag_seconds is not None else -1.0),
        "applied_heartbeat": lag.applied_heartbeat.isoformat() if lag.applied_heartbeat else "",
        # One plotted series per topic: a data topic far behind shows even while heartbeats flow.
        **{
            f"lag_seconds:{topic}": dg.FloatMetadataValue(round(age, 3)) for topic, age in lag.per_topic_seconds.items()
        },
    }


def _store_lag_metadata(store: str, lag: LagHealth) -> dict[str, Any]:
    """`_lag_metadata` of one store among several: `lag_seconds:elasticsearch`, `lag_seconds:elasticsearch:cdc-User`."""
    out = {}
    for key, value in _lag_metadata(lag).items():
        name, _, topic = key.partition(":")
        out[f"{name}:{store}" + (f":{topic}" if topic else "")] = value
    return out


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "replication_slot",
            asset=HEARTBEAT_ASSET,
            description="Debezium's slot exists and is active, wal_status is not unreserved/lost, retained WAL is low.",
        ),
        *[
            dg.AssetCheckSpec(
                lag_check_name(store),
                asset=HEARTBEAT_ASSET,
                description=(
                    f"The oldest change on any cdc-* topic that the {store} sink has not written yet, and at least the "
                    "age of Debezium's newest heartbeat: WARN above 30 s, ERROR above 60 s."
                ),
            )
            for store in TARGETS
        ],
        dg.AssetCheckSpec(
            "idle_transactions",
            asset=HEARTBEAT_ASSET,
            description=(
                "No session idle in an open transaction: it holds back vacuum and the locks it took. "
                "WARN above 60 s, ERROR above 300 s, naming the pid, its age and its last statement."
            ),
        ),
    ],
    can_subset=True,
    name="replication_health",
)
def replication_health(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    kafka: KafkaResource,
    replication_thresholds: ReplicationThresholds,
) -> Any:
    selected = {k.name for k in context.selected_asset_check_keys}
    if "replication_slot" in selected or "idle_transactions" in selected:
        with postgres.get_connection(autocommit=True) as conn:
            if "replication_slot" in selected:
                slot = slot_health(conn, replication_thresholds.slot())
                yield _result("replication_slot", slot.verdict, slot.reason, _slot_metadata(slot))
            if "idle_transactions" in selected:
                idle = idle_transaction_health(conn, replication_thresholds.idle())
                yield _result("idle_transactions", idle.verdict, idle.reason, _idle_metadata(idle))
    stores = [store for store in TARGETS if lag_check_name(store) in selected]
    published = published_heartbeat(kafka.bootstrap_servers) if stores else None
    for store in stores:
        lag = end_to_end_lag(store, kafka.bootstrap_servers, replication_thresholds.lag(), published)
        yield _result(lag_check_name(store), lag.verdict, lag.reason, _lag_metadata(lag))


def up_to_date_events(store: str, lag: LagHealth) -> list[dg.AssetMaterialization]:
    """The store's assets as brought up to date by its sink, with how far behind it was."""
    return [
        dg.AssetMaterialization(
            asset_key=store_asset_key(store, t),
            description=f"brought up to date by the {store} sink ({lag.reason})",
            metadata={
                "sink_group": sink_group(store),
                "applied_heartbeat": lag.applied_heartbeat.isoformat() if lag.applied_heartbeat else "",
                "lag_seconds": dg.FloatMetadataValue(round(lag.lag_seconds or 0.0, 3)),
            },
        )
        for t in TABLES
        if TARGETS[store].holds(t)
    ]


def _result(name: str, verdict: str, reason: str, metadata: dict[str, Any]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name, passed=verdict == "ok", severity=SEVERITY[verdict], description=reason, metadata=metadata
    )


@dg.sensor(
    job=heal_replication,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Records slot state, retained WAL and end-to-end lag on postgres/ops/heartbeat; alerts on ERROR; launches "
        "heal_replication when the slot is gone or lost."
    ),
)
def replication_lag_sensor(
    context: dg.SensorEvaluationContext,
    postgres: PostgresResource,
    kafka: KafkaResource,
    alerts: AlertsResource,
    replication_thresholds: ReplicationThresholds,
) -> dg.SensorResult:
    state = ReplicationCursor.load(context)
    book = AlertBook.from_json(state.alerts)
    with postgres.get_connection(autocommit=True) as conn:
        slot = slot_health(conn, replication_thresholds.slot())
        idle = idle_transaction_health(conn, replication_thresholds.idle())
    published = published_heartbeat(kafka.bootstrap_servers)
    lags = {
        store: end_to_end_lag(store, kafka.bootstrap_servers, replication_thresholds.lag(), published)
        for store in TARGETS
    }
    now = time.time()
    dispatch = Dispatch(alerts.channels(context.log), context.log)
    for key, failing, title, text in (
        ("replication:slot", slot.verdict == "error", "Replication slot needs attention", slot.reason),
        *[
            (f"replication:lag:{store}", lag.verdict == "error", f"The {store} sink lags behind the limit", lag.reason)
            for store, lag in lags.items()
        ],
        ("replication:idle_transaction", idle.verdict == "error", "A session is idle in a transaction", idle.reason),
    ):
        message = book.update(Alert(key, "error", title, text), failing, now, alerts.throttle_seconds)
        if message is not None and dispatch.send(message):  # undelivered: due again next tick
            book.mark_sent(message, now)
    state.alerts = book.to_json()
    lag_metadata = {k: v for store, lag in lags.items() for k, v in _store_lag_metadata(store, lag).items()}
    observation = dg.AssetObservation(
        asset_key=HEARTBEAT_ASSET, metadata={**_slot_metadata(slot), **lag_metadata, **_idle_metadata(idle)}
    )
    runs = []
    events: list[dg.AssetObservation | dg.AssetMaterialization] = [observation]
    for store, lag in lags.items():
        # A caught-up sink has brought its store's assets up to date: recorded (at most once a minute) as a
        # materialization, which is what the assets' freshness policy reads.
        if lag.verdict == "ok" and now - state.up_to_date_at.get(store, 0.0) >= UP_TO_DATE_EVERY_SECONDS:
            state.up_to_date_at[store] = now
            events += up_to_date_events(store, lag)
    state.alerts = book.to_json()
    with postgres.get_connection(autocommit=True) as conn:
        unfinished = open_incident(conn, HEAL_INCIDENT) is not None
    if (slot_lost(slot) or unfinished) and run_in_flight(context.instance, heal_replication) is None:
        # At most one heal run per five minutes: the first at once, then a retry while the heal does not finish.
        runs.append(
            dg.RunRequest(
                run_key=f"heal-replication-{int(now // HEAL_RETRY_SECONDS)}",
                run_config=dg.RunConfig(ops={heal_cdc.name: HealReplicationConfig()}),
                tags={"knowton/reason": "replication slot lost" if slot_lost(slot) else "unfinished heal"},
            )
        )
    return dg.SensorResult(
        run_requests=runs,
        asset_events=events,
        cursor=state.dump(),
        skip_reason=None
        if runs
        else f"slot {slot.verdict}; "
        + "; ".join(f"{store} lag {lag.verdict}: {lag.reason}" for store, lag in lags.items()),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        asset_checks=[replication_health],
        sensors=[replication_lag_sensor],
        resources={"replication_thresholds": ReplicationThresholds()},
    )
