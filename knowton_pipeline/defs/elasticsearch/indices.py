"""One asset per Elasticsearch index, partitioned by creation day: materializing days backfills them."""

from typing import Literal

import dagster as dg
from pydantic import Field

from knowton_pipeline.catalog import TABLES, SyncedTable, table
from knowton_pipeline.defs.backfill import run_backfill
from knowton_pipeline.defs.kafka_connect.assets import cdc_topic_key
from knowton_pipeline.defs.partitions import DAILY, SYNCED
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ElasticsearchResource, PostgresResource
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.backfill import BackfillStats
from knowton_pipeline.lib.sync.rebuild import rebuild_index


def index_key(t: SyncedTable) -> dg.AssetKey:
    assert t.elasticsearch_index is not None
    return dg.AssetKey(["elasticsearch", t.elasticsearch_index])


def index_asset(t: SyncedTable) -> dg.AssetsDefinition:
    @dg.asset(
        key=index_key(t),
        # A document also shows fields derived from other tables: their changes reach it too.
        deps=[cdc_topic_key(t), *(cdc_topic_key(table(d.table)) for d in t.dependencies)],
        partitions_def=DAILY,
        freshness_policy=SYNCED,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="elasticsearch",
        kinds={"elasticsearch"},
        description=(
            f"Search index (alias {t.elasticsearch_index}) of {t.qualified_name}, kept current by the search sink. "
            "Materializing partitions re-indexes the rows created on those days, versioned at the snapshot LSN."
        ),
        metadata={"alias": t.elasticsearch_index, "source": t.qualified_name},
    )
    def _index(
        context: dg.AssetExecutionContext, postgres: PostgresResource, elasticsearch: ElasticsearchResource
    ) -> dg.MaterializeResult:
        with elasticsearch.get_client() as es:
            return run_backfill(
                context,
                postgres,
                t,
                ElasticsearchWriter(es),
                after_each_day=lambda: es.indices.refresh(index=t.elasticsearch_index),
            )

    return _index


# The tables with a search index, as the launchpad's choice (checked against the catalog below).
SEARCHABLE = [t for t in TABLES if t.elasticsearch_index]
# The launchpad's choice of tables, built from the catalog: a table added there is offered here with no edit.
IndexedTable = Literal[tuple(t.name for t in SEARCHABLE)]  # type: ignore[valid-type]


class RebuildSearchIndexConfig(dg.Config):
    table: IndexedTable = Field("User", description="the table whose search index is rebuilt")


# In the ClickHouse pool although it writes only Elasticsearch: that serializes it with apply_cdc
# and reprocess_dlq, so no CDC write can land in the old index after the final copy.
@dg.op(pool=CLICKHOUSE_POOL, description="Rebuild one search index into a new versioned index and swap its alias.")
def rebuild_search_index_op(
    context: dg.OpExecutionContext,
    config: RebuildSearchIndexConfig,
    postgres: PostgresResource,
    elasticsearch: ElasticsearchResource,
) -> dg.Output[dict]:
    t = table(config.table)

    def progress(s: BackfillStats) -> None:
        context.log.info(f"{s.rows} rows indexed into the new index ({s.rows_per_second:,.0f} rows/s)")

    with postgres.get_connection() as conn, elasticsearch.get_client() as es:
        result = rebuild_index(conn, es, t, on_progress=progress)
    context.log.info(f"alias {result.alias}: {result.old_index} -> {result.new_index}")
    context.log_event(
        dg.AssetObservation(
            asset_key=index_key(t),
            metadata={"rebuilt_into": result.new_index, "rows": result.rows, "seconds": round(result.seconds, 2)},
        )
    )
    return dg.Output(
        {"new_index": result.new_index},
        metadata={
            "old_index": result.old_index or "",
            "new_index": result.new_index,
            "rows": result.rows,
            "copied_during_rebuild": result.copied_during_rebuild,
            "seconds": round(result.seconds, 2),
        },
    )


@dg.job(description="Full rebuild of a search index (run config: table) with no moment of a half-built index.")
def rebuild_search_index() -> None:
    rebuild_search_index_op()


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[index_asset(t) for t in SEARCHABLE], jobs=[rebuild_search_index])
