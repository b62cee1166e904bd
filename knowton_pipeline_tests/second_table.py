"""Run by `test_second_table.py` in a process of its own: a table that exists only here is added to the catalog,
then the project's own definitions are loaded and run for it, with no other edit anywhere.

It prints one JSON line: what the definitions hold for the table and what their runs found. It expects the table
in PostgreSQL and its index in Elasticsearch (the test creates them, as "its DDL"), and a ClickHouse DSN of its
own (an embedded engine is open in one process at a time), where it creates the mirror.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from knowton_pipeline import catalog
from knowton_pipeline.catalog import Column, SyncedTable

TAG = SyncedTable(
    name="Tag",
    key=("id",),
    columns=(
        Column("id", "bigint"),
        Column("label", "text"),
        Column("weight", "numeric", scale=2),
        Column("note", "text", nullable=True, in_elasticsearch=False),
        Column("createdAt", "timestamptz"),
        Column("updatedAt", "timestamptz"),
    ),
    clickhouse_table="tags",
    elasticsearch_index="knowton-tags",
    description="Tags, a table known to this run only.",
)
# The one edit adding a table takes: its catalog entry. Made before anything else imports the catalog.
catalog.TABLES = (*catalog.TABLES, TAG)
catalog.CDC_TABLES = (*catalog.TABLES, catalog.HEARTBEAT)

MIRROR_DDL = """
CREATE TABLE IF NOT EXISTS knowton.tags
(
    id         Int64,
    label      String,
    weight     Decimal(12, 2),
    note       Nullable(String),
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC'),
    version    UInt64,
    is_deleted UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id
"""


def _evaluations(result: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            e = event.event_specific_data
            out[f"{e.asset_key.to_user_string()}:{e.check_name}"] = {
                "passed": e.passed,
                "differing_keys": e.metadata["differing_keys"].value if "differing_keys" in e.metadata else None,
            }
    return out


def main() -> dict[str, Any]:
    import dagster as dg
    from elasticsearch import Elasticsearch

    from knowton_pipeline.definitions import defs
    from knowton_pipeline.defs.resources import build_resources
    from knowton_pipeline.lib import clickhouse
    from knowton_pipeline.lib.settings import Settings

    settings = Settings.from_env()
    definitions = defs()
    keys = {k.to_user_string() for k in definitions.resolve_asset_graph().get_all_asset_keys()}
    checks = {f"{k.asset_key.to_user_string()}:{k.name}" for k in definitions.resolve_asset_graph().asset_check_keys}
    with clickhouse.connection(settings.clickhouse_dsn) as ch:
        ch.command("CREATE DATABASE IF NOT EXISTS knowton")
        ch.command(MIRROR_DDL)
    report: dict[str, Any] = {
        "assets": sorted(k for k in keys if "tag" in k.lower()),
        "checks": sorted(c for c in checks if "tag" in c.lower()),
    }
    mirror = dg.AssetKey(["clickhouse", "knowton", "tags"])
    index = dg.AssetKey(["elasticsearch", "knowton-tags"])
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    reconcile = definitions.resolve_job_def("reconcile")

    def run_reconcile(instance: dg.DagsterInstance, **config: Any) -> dict[str, dict[str, Any]]:
        result = reconcile.execute_in_process(
            run_config={"ops": {"reconcile_stores": {"config": {"tables": ["Tag"], "settle_seconds": 0, **config}}}},
            instance=instance,
            resources=build_resources(),
            raise_on_error=False,
        )
        return _evaluations(result)

    with dg.instance_for_test() as instance:
        for key in (mirror, index):
            result = dg.materialize(
                [definitions.resolve_assets_def(key)],
                partition_key=day,
                instance=instance,
                selection=[key],
            )
            report[f"materialized {key.to_user_string()}"] = result.success
        report["first"] = run_reconcile(instance, mode="full")
        # Drift in both targets: a mirror row and a search document that no longer say what PostgreSQL says.
        with clickhouse.connection(settings.clickhouse_dsn) as ch:
            ch.command(
                "INSERT INTO knowton.tags SELECT * REPLACE ('drifted' AS label, version + 1 AS version) "
                "FROM knowton.tags FINAL WHERE id = 2"
            )
        es = Elasticsearch(settings.es_url, request_timeout=30)
        try:
            hit = es.get(index="knowton-tags", id="3")
            es.index(
                index=hit["_index"],
                id="3",
                document={**hit["_source"], "label": "drifted"},
                version=hit["_version"] + 1,
                version_type="external_gte",
                refresh=True,
            )
        finally:
            es.close()
        report["drifted"] = run_reconcile(instance, mode="full")
        report["repaired"] = run_reconcile(instance, mode="full", repair=True)
        report["after_repair"] = run_reconcile(instance, mode="full")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), default=str))
    sys.stdout.flush()
