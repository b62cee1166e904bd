"""One asset per ClickHouse mirror, partitioned by creation day: materializing days backfills them."""

import dagster as dg
from pydantic import Field

from knowton_pipeline.catalog import TABLES, SyncedTable
from knowton_pipeline.defs.backfill import run_backfill
from knowton_pipeline.defs.kafka_connect.assets import cdc_topic_key
from knowton_pipeline.defs.partitions import DAILY, SYNCED
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource, KafkaResource, PostgresResource
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter


def mirror_key(t: SyncedTable) -> dg.AssetKey:
    return dg.AssetKey(["clickhouse", "knowton", t.clickhouse_table])


class MirrorBackfillConfig(dg.Config):
    sink_turn_seconds: float = Field(
        30.0, description="how often the ClickHouse sink applies CDC between the backfill's chunks (embedded engine)"
    )


def mirror_asset(t: SyncedTable) -> dg.AssetsDefinition:
    @dg.asset(
        key=mirror_key(t),
        deps=[cdc_topic_key(t)],
        partitions_def=DAILY,
        freshness_policy=SYNCED,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=CLICKHOUSE_POOL,
        group_name="clickhouse",
        kinds={"clickhouse"},
        description=(
            f"ReplacingMergeTree mirror of {t.qualified_name}, kept current by the ClickHouse sink (apply_cdc). Materializing "
            "partitions re-syncs the rows created on those days from PostgreSQL, versioned at the snapshot LSN."
        ),
        metadata={"table": f"knowton.{t.clickhouse_table}", "source": t.qualified_name},
    )
    def _mirror(
        context: dg.AssetExecutionContext,
        config: MirrorBackfillConfig,
        postgres: PostgresResource,
        kafka: KafkaResource,
        clickhouse_store: ClickHouseResource,
    ) -> dg.MaterializeResult:
        with clickhouse_store.get_client() as client:
            # While the backfill holds the embedded engine, `apply_cdc` cannot run: its sink takes turns here.
            turns = clickhouse_store.sink_turns(client, kafka, postgres, every=config.sink_turn_seconds)
            return run_backfill(context, postgres, t, ClickHouseWriter(client), between_chunks=turns)

    return _mirror


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[mirror_asset(t) for t in TABLES])
