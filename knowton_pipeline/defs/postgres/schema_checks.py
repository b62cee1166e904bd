"""Schema drift checks, one per synced table (on its PostgreSQL asset), and the `health_checks` job that
runs them with the replication checks every ten minutes."""

from typing import Any

import dagster as dg

from knowton_pipeline.catalog import TABLES
from knowton_pipeline.defs.maintenance.jobs import storage_checks
from knowton_pipeline.defs.postgres.assets import postgres_table_key
from knowton_pipeline.defs.postgres.replication import replication_health
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource, ElasticsearchResource, PostgresResource
from knowton_pipeline.lib.health.schema_drift import schema_drift

CHECK_NAME = "schema_matches_stores"
_BY_KEY = {dg.AssetCheckKey(postgres_table_key(t), CHECK_NAME): t for t in TABLES}


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=postgres_table_key(t),
            description=(
                f"{t.qualified_name}'s columns against the catalog, the ClickHouse mirror and the search mapping: a new "
                "PostgreSQL column is a WARN, a dropped or retyped one an ERROR, with the exact difference."
            ),
        )
        for t in TABLES
    ],
    can_subset=True,
    name="schema_drift",
    pool=CLICKHOUSE_POOL,
)
def schema_drift_checks(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> Any:
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        for key in sorted(context.selected_asset_check_keys, key=lambda k: k.to_user_string()):
            drift = schema_drift(conn, _BY_KEY[key], clickhouse=ch, es=es)
            yield dg.AssetCheckResult(
                asset_key=key.asset_key,
                check_name=CHECK_NAME,
                passed=drift.verdict == "ok",
                severity=dg.AssetCheckSeverity.ERROR if drift.verdict == "error" else dg.AssetCheckSeverity.WARN,
                description=drift.describe(),
                metadata={
                    "new_in_postgres": dg.MetadataValue.json(drift.new_in_postgres),
                    "errors": dg.MetadataValue.json(drift.errors),
                    "error_count": dg.IntMetadataValue(len(drift.errors)),
                },
            )


health_checks = dg.define_asset_job(
    "health_checks",
    selection=dg.AssetSelection.checks(schema_drift_checks, replication_health, storage_checks),
    description="Schema drift of every synced table, the replication slot, end-to-end lag and what each store keeps.",
)

health_checks_schedule = dg.ScheduleDefinition(
    name="health_checks_every_10_minutes",
    job=health_checks,
    cron_schedule="*/10 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(asset_checks=[schema_drift_checks], jobs=[health_checks], schedules=[health_checks_schedule])
