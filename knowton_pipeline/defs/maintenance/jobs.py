"""Housekeeping: the `maintenance` job (daily) purges tombstones past their window and prunes the project's and
Dagster's history; the `storage` checks record what each mirror and index holds, so the UI plots growth."""

from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from knowton_pipeline.catalog import TABLES, table
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource, ElasticsearchResource, PostgresResource
from knowton_pipeline.defs.store_assets import store_asset_key
from knowton_pipeline.lib.maintenance import RetentionPolicy, run_maintenance
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH

STORAGE_CHECK = "storage"
_STORAGE_PAIRS = {
    dg.AssetCheckKey(store_asset_key(store.name, t), STORAGE_CHECK): (store.name, t)
    for store in TARGETS.values()
    for t in TABLES
    if store.holds(t)
}


class StorageConfig(dg.Config):
    warn_tombstone_share: float = Field(
        0.2, ge=0, le=1, description="WARN when tombstones are more than this share of the rows a store keeps"
    )


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            STORAGE_CHECK,
            asset=key.asset_key,
            description=(
                f"What {store} stores for {t.name}: rows (every version, tombstones included), tombstones and bytes; "
                "a WARN when tombstones pile up (the daily maintenance purges those past their window)."
            ),
        )
        for key, (store, t) in _STORAGE_PAIRS.items()
    ],
    can_subset=True,
    name="storage",
    pool=CLICKHOUSE_POOL,
)
def storage_checks(
    context: dg.AssetCheckExecutionContext,
    config: StorageConfig,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> Any:
    with clickhouse_store.get_client() as ch, elasticsearch.get_client() as es:
        clients = {CLICKHOUSE.name: ch, ELASTICSEARCH.name: es}
        for key in sorted(context.selected_asset_check_keys, key=lambda k: k.to_user_string()):
            name, t = _STORAGE_PAIRS[key]
            held = TARGETS[name].storage(clients[name], t)
            share = held["tombstones"] / held["rows"] if held["rows"] else 0.0
            yield dg.AssetCheckResult(
                asset_key=key.asset_key,
                check_name=STORAGE_CHECK,
                passed=share <= config.warn_tombstone_share,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{held['tombstones']} of {held['rows']} stored rows are tombstones ({share:.1%})",
                metadata={
                    "stored_rows": dg.IntMetadataValue(held["rows"]),
                    "tombstones": dg.IntMetadataValue(held["tombstones"]),
                    "bytes": dg.IntMetadataValue(held["bytes"]),
                    "tombstone_share": dg.FloatMetadataValue(round(share, 4)),
                },
            )


class MaintenanceConfig(dg.Config):
    tombstone_window_days: float = Field(
        7.0, gt=0, description="deletes older than this are purged from the mirrors and indices"
    )
    reconcile_history_days: float = Field(90.0, gt=0, description="ops.reconcile_runs and their differing keys")
    backfill_progress_days: float = Field(30.0, gt=0, description="ops.backfill_progress")
    resolved_dlq_days: float = Field(30.0, gt=0, description="parked DLQ records an operator resolved")
    run_history_days: float = Field(
        90.0, gt=0, description="finished runs of the sensor-launched jobs older than this are deleted"
    )

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(
            tombstone_window=timedelta(days=self.tombstone_window_days),
            reconcile_history=timedelta(days=self.reconcile_history_days),
            backfill_progress=timedelta(days=self.backfill_progress_days),
            resolved_dlq=timedelta(days=self.resolved_dlq_days),
        )


# Runs whose events are only their own logs: the ones sensors launch every few minutes. Runs that materialize
# assets or evaluate checks are kept: deleting a run deletes its events, and with them the partitions it
# materialized and the check history the UI plots.
PRUNED_JOBS = ("apply_cdc", "reprocess_dlq", "restart_failed_connectors", "maintenance", "heal_replication")


def _delete_old_runs(instance: dg.DagsterInstance, days: float, current_run_id: str) -> int:
    """Finished runs of `PRUNED_JOBS` created before the cutoff (their event logs go with them)."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
    deleted = 0
    for job in PRUNED_JOBS:
        records = instance.get_run_records(
            filters=dg.RunsFilter(job_name=job, statuses=finished, created_before=cutoff), limit=1000
        )
        for record in records:
            if record.dagster_run.run_id != current_run_id:
                instance.delete_run(record.dagster_run.run_id)
                deleted += 1
    return deleted


@dg.op(pool=CLICKHOUSE_POOL, description="Purge tombstones past their window, prune ops.* and old Dagster runs.")
def maintain(
    context: dg.OpExecutionContext,
    config: MaintenanceConfig,
    postgres: PostgresResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> dg.Output[dict]:
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        report = run_maintenance(
            conn, {CLICKHOUSE.name: ch, ELASTICSEARCH.name: es}, config.policy(), on_progress=context.log.info
        )
    runs = _delete_old_runs(context.instance, config.run_history_days, context.run.run_id)
    for store, tables in report.purged.items():
        for name, removed in tables.items():
            t = table(name)
            context.log_event(
                dg.AssetObservation(asset_key=store_asset_key(store, t), metadata={"tombstones_purged": removed})
            )
    metadata = {**report.as_metadata(), "dagster_runs_deleted": runs}
    context.log.info(f"maintenance: {metadata}")
    return dg.Output(metadata, metadata=metadata)


@dg.job(description="Purge tombstones older than their window from every store and prune the project's history.")
def maintenance() -> None:
    maintain()


maintenance_daily = dg.ScheduleDefinition(
    name="maintenance_daily",
    job=maintenance,
    cron_schedule="15 4 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The maintenance job, daily, after the nightly full reconciliation.",
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(asset_checks=[storage_checks], jobs=[maintenance], schedules=[maintenance_daily])
