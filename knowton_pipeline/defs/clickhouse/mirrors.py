"""One asset per ClickHouse mirror, partitioned by creation day: materializing days backfills them."""

import dagster as dg

from knowton_pipeline.catalog import TABLES, SyncedTable
from knowton_pipeline.defs.backfill import run_backfill
from knowton_pipeline.defs.kafka_connect.assets import cdc_topic_key
from knowton_pipeline.defs.partitions import DAILY
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource, PostgresResource
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter


def mirror_key(t: SyncedTable) -> dg.AssetKey:
    return dg.AssetKey(["clickhouse", "knowton", t.clickhouse_table])


def mirror_asset(t: SyncedTable) -> dg.AssetsDefinition:
    @dg.asset(
        key=mirror_key(t),
        deps=[cdc_topic_key(t)],
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=CLICKHOUSE_POOL,
        group_name="clickhouse",
        kinds={"clickhouse"},
        description=(
            f"ReplacingMergeTree mirror of {t.qualified_name}, kept current by apply_cdc. Materializing "
            "partitions re-syncs the rows created on those days from PostgreSQL, versioned at the snapshot LSN."
        ),
        metadata={"table": f"knowton.{t.clickhouse_table}", "source": t.qualified_name},
    )
    def _mirror(
        context: dg.AssetExecutionContext, postgres: PostgresResource, clickhouse_store: ClickHouseResource
    ) -> dg.MaterializeResult:
        with clickhouse_store.get_client() as client:
            return run_backfill(context, postgres, t, ClickHouseWriter(client))

    return _mirror


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[mirror_asset(t) for t in TABLES])
