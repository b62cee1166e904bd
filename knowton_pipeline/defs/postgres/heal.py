"""`heal_replication`: bring CDC back after its replication slot was lost, then re-sync what was committed
while it was down. `replication_lag_sensor` launches it as soon as a tick sees the slot gone or lost."""

import dagster as dg
from pydantic import Field

from knowton_pipeline.defs.kafka_connect.assets import CDC_CONNECTOR
from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    AlertsResource,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaConnectResource,
    PostgresResource,
)
from knowton_pipeline.lib.connectors import load_connector_configs
from knowton_pipeline.lib.health.alerts import Alert, Dispatch
from knowton_pipeline.lib.health.heal import restore_cdc, resume_cdc, slot_lost
from knowton_pipeline.lib.health.replication import slot_health
from knowton_pipeline.lib.reconcile.flow import Connections, ReconcileRequest, reconcile_pairs
from knowton_pipeline.lib.reconcile.record import open_incident, track_incident
from knowton_pipeline.lib.reconcile.run import is_aggregate, plan_pairs
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH

HEAL_INCIDENT = "replication slot lost"


class HealReplicationConfig(dg.Config):
    max_repair_keys: int = Field(
        1_000_000, description="the gap's re-sync repairs at most this many keys per table and target"
    )
    settle_seconds: float = Field(2.0, description="the reconciliation's re-check of in-flight keys")


@dg.op(
    pool=CLICKHOUSE_POOL,
    description=(
        "Stop the CDC connector, recreate the replication slot, restart the connector streaming from it, then "
        "reconcile and repair every synced table so the changes committed while CDC was down reach both stores."
    ),
)
def heal_cdc(
    context: dg.OpExecutionContext,
    config: HealReplicationConfig,
    postgres: PostgresResource,
    kafka_connect: KafkaConnectResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
    alerts: AlertsResource,
) -> dg.Output[dict]:
    with postgres.get_connection(autocommit=True) as conn:
        slot = slot_health(conn)
        unfinished = open_incident(conn, HEAL_INCIDENT)
        if not slot_lost(slot) and unfinished is None:
            context.log.info(f"nothing to heal: {slot.reason}")
            return dg.Output({"healed": False}, metadata={"healed": False, "slot": slot.reason})
        # The incident lives until the re-sync is verified: a heal interrupted after the slot came back (a
        # timeout, a store outage) is resumed by the next run instead of leaving the gap unsynced.
        track_incident(conn, HEAL_INCIDENT, True, slot.reason)
        connect = kafka_connect.get_client()
        configured = load_connector_configs()[CDC_CONNECTOR]
        if slot_lost(slot):
            context.log.warning(f"replication slot lost: {slot.reason}")
            restored = restore_cdc(conn, connect, CDC_CONNECTOR, configured, on_progress=context.log.info)
        else:
            context.log.warning(f"resuming an unfinished heal: {unfinished}")
            restored = resume_cdc(conn, connect, CDC_CONNECTOR, configured, on_progress=context.log.info)
        pairs = [p for p in plan_pairs() if not is_aggregate(p[0])]
        request = ReconcileRequest(
            mode="checksum",
            settle_seconds=config.settle_seconds,
            repair=True,
            max_repair_keys=config.max_repair_keys,
            repair_reason=f"replication slot lost: re-sync of the changes committed before CDC resumed at {restored.slot_lsn}",
        )
        repaired: dict[str, int] = {}
        failed: list[str] = []
        with clickhouse_store.get_client() as ch, elasticsearch.get_client() as es:
            clients = {CLICKHOUSE.name: ch, ELASTICSEARCH.name: es}
            for outcome in reconcile_pairs(Connections(conn, clients), pairs, request, on_progress=context.log.info):
                pair = f"{outcome.table} -> {outcome.target}"
                if outcome.result is None or outcome.repair_refused or outcome.remaining_drift:
                    failed.append(f"{pair}: {outcome.error or outcome.repair_refused or 'keys still differ'}")
                repaired[pair] = outcome.repair.requested if outcome.repair else 0
    text = (
        f"The replication slot was lost ({slot.reason}). CDC was restored: slot recreated at {restored.slot_lsn}, "
        f"connector {CDC_CONNECTOR} streaming from it. Re-synced from PostgreSQL: "
        + ", ".join(f"{pair} {n} key(s)" for pair, n in repaired.items())
        + (f". Not healed: {'; '.join(failed)}" if failed else ".")
    )
    Dispatch(alerts.channels(context.log), context.log).send(
        Alert(
            "replication:healed",
            "error" if failed else "recovery",
            "CDC restored after the replication slot was lost" if not failed else "CDC restored, re-sync incomplete",
            text,
        )
    )
    if failed:
        raise dg.Failure(description=f"{len(failed)} table(s) not re-synced:\n" + "\n".join(failed))
    with postgres.get_connection(autocommit=True) as conn:
        healed_after = track_incident(conn, HEAL_INCIDENT, False, "") or 0.0
    metadata = {
        "healed": True,
        "slot_lsn": restored.slot_lsn,
        "keys_resynced": sum(repaired.values()),
        "time_to_heal_seconds": round(healed_after, 1),
    }
    return dg.Output(metadata, metadata=metadata)


@dg.job(description="Recreate a lost replication slot, restart CDC from it and re-sync what it missed.")
def heal_replication() -> None:
    heal_cdc()


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(jobs=[heal_replication])
