"""The synced PostgreSQL tables, declared from the catalog as external AssetSpecs."""

import dagster as dg

from knowton_pipeline.catalog import CDC_TABLES, SyncedTable


def postgres_table_key(t: SyncedTable) -> dg.AssetKey:
    return dg.AssetKey(["postgres", t.schema, t.name])


def postgres_table_spec(t: SyncedTable) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=postgres_table_key(t),
        description=t.description,
        group_name="postgres",
        kinds={"postgres"},
        metadata={"primary_key": ", ".join(t.key), "table": f'"{t.schema}"."{t.name}"'},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[postgres_table_spec(t) for t in CDC_TABLES])
