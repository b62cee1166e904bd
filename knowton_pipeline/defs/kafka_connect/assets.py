"""The `cdc-*` topics as external AssetSpecs, each downstream of the PostgreSQL table it carries."""

import dagster as dg

from knowton_pipeline.catalog import CDC_TABLES, SyncedTable
from knowton_pipeline.defs.postgres.assets import postgres_table_key

CDC_CONNECTOR = "postgres-cdc-source-connector"


def cdc_topic_key(t: SyncedTable) -> dg.AssetKey:
    return dg.AssetKey(["kafka", "topics", t.topic])


def cdc_topic_spec(t: SyncedTable) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=cdc_topic_key(t),
        deps=[postgres_table_key(t)],
        description=f"Debezium change events of {t.qualified_name} (pgoutput, routed by RegexRouter).",
        group_name="cdc",
        kinds={"kafka"},
        metadata={"topic": t.topic, "connector": CDC_CONNECTOR},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[cdc_topic_spec(t) for t in CDC_TABLES])
