"""One asset per Elasticsearch index, partitioned by creation day: materializing days backfills them."""

import dagster as dg

from knowton_pipeline.catalog import TABLES, SyncedTable, table
from knowton_pipeline.defs.kafka_connect.assets import cdc_topic_key
from knowton_pipeline.defs.partitions import DAILY
from knowton_pipeline.defs.resources import ElasticsearchResource, PostgresResource
from knowton_pipeline.lib.sync.backfill import BackfillStats, backfill_range
from knowton_pipeline.lib.sync.writers import ElasticsearchWriter

# Documents that carry fields of other tables (Content: creator username, sales count).
ENRICHED_FROM = {"Content": ("User", "Purchase")}


def index_key(t: SyncedTable) -> dg.AssetKey:
    assert t.elasticsearch_index is not None
    return dg.AssetKey(["elasticsearch", t.elasticsearch_index])


def index_asset(t: SyncedTable) -> dg.AssetsDefinition:
    @dg.asset(
        key=index_key(t),
        deps=[cdc_topic_key(t), *(cdc_topic_key(table(n)) for n in ENRICHED_FROM.get(t.name, ()))],
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=31),
        group_name="elasticsearch",
        kinds={"elasticsearch"},
        description=(
            f"Search index (alias {t.elasticsearch_index}) of {t.qualified_name}, kept current by apply_cdc. "
            "Materializing partitions re-indexes the rows created on those days, versioned at the snapshot LSN."
        ),
        metadata={"alias": t.elasticsearch_index, "source": t.qualified_name},
    )
    def _index(
        context: dg.AssetExecutionContext, postgres: PostgresResource, elasticsearch: ElasticsearchResource
    ) -> dg.MaterializeResult:
        window = context.partition_time_window
        context.log.info(f"re-indexing {t.name} rows created in [{window.start}, {window.end})")

        def progress(s: BackfillStats) -> None:
            context.log.info(f"{s.rows} rows read, {s.written} indexed ({s.rows_per_second:,.0f} rows/s)")

        with postgres.get_connection() as conn, elasticsearch.get_client() as es:
            stats = backfill_range(conn, t, window.start, window.end, ElasticsearchWriter(es), on_progress=progress)
            es.indices.refresh(index=t.elasticsearch_index)
        return dg.MaterializeResult(
            metadata={
                "rows": stats.rows,
                "written": stats.written,
                "stale_refused": stats.stale,
                "snapshot_lsn": stats.snapshot_lsn,
                "seconds": round(stats.seconds, 3),
                "rows_per_second": round(stats.rows_per_second, 1),
            }
        )

    return _index


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[index_asset(t) for t in TABLES if t.elasticsearch_index])
