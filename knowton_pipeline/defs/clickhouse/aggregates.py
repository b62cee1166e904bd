"""Daily analytics aggregates computed from the ClickHouse mirrors, one partition per UTC day, each swapped in atomically."""

import time

import dagster as dg

from knowton_pipeline.catalog import TABLES
from knowton_pipeline.defs.clickhouse.mirrors import mirror_key
from knowton_pipeline.defs.partitions import DAILY
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource
from knowton_pipeline.lib.aggregates import AGGREGATES, Aggregate, day_totals, replace_day


def aggregate_key(agg: Aggregate) -> dg.AssetKey:
    return dg.AssetKey(["clickhouse", "knowton", agg.name])


def aggregate_asset(agg: Aggregate) -> dg.AssetsDefinition:
    # The catalog says which tables feed which aggregate.
    sources = [t for t in TABLES if agg.name in t.feeds]

    @dg.asset(
        key=aggregate_key(agg),
        deps=[mirror_key(t) for t in sources],
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=CLICKHOUSE_POOL,
        group_name="clickhouse_aggregates",
        kinds={"clickhouse"},
        description=(
            f"Daily aggregate {agg.table}, computed from the mirrors of "
            f"{', '.join(t.qualified_name for t in sources)} read with FINAL. Each UTC day is recomputed into "
            f"{agg.staging_table} and swapped in with REPLACE PARTITION, so re-running a day is safe."
        ),
        metadata={"table": agg.table, "sql": f"sql/clickhouse/{agg.day_sql}"},
    )
    def _aggregate(context: dg.AssetExecutionContext, clickhouse_store: ClickHouseResource) -> dg.MaterializeResult:
        started = time.monotonic()
        days = [DAILY.time_window_for_partition_key(key).start.date() for key in context.partition_keys]
        rows = 0
        with clickhouse_store.get_client() as client:
            for day in days:
                written = replace_day(client, agg.name, day)
                context.log.info(f"{agg.table} {day}: {written} rows")
                rows += written
            totals = day_totals(client, agg.name, days)
        return dg.MaterializeResult(
            metadata={
                "rows": rows,
                "days": len(days),
                **totals,
                "seconds": round(time.monotonic() - started, 3),
            }
        )

    return _aggregate


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[aggregate_asset(agg) for agg in AGGREGATES.values()])
