"""Schema drift: a synced table's columns in PostgreSQL, in the catalog, in its ClickHouse mirror and in its
search mapping, compared. A column PostgreSQL has and the catalog does not is a WARN (nothing breaks, the
column is just not synced); a catalog column that PostgreSQL, the mirror or the mapping lacks, or holds
with another type, is an ERROR (the transform or the apply will fail on it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.stores import postgres as pg_store
from knowton_pipeline.lib.stores import targets_of
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH

Verdict = Literal["ok", "warn", "error"]


@dataclass
class SchemaDrift:
    table: str
    new_in_postgres: list[str] = field(default_factory=list)  # WARN: not in the catalog, so not synced
    errors: list[str] = field(default_factory=list)  # each one exact: store, column, expected, found

    @property
    def verdict(self) -> Verdict:
        return "error" if self.errors else "warn" if self.new_in_postgres else "ok"

    def describe(self) -> str:
        parts = [f"new in PostgreSQL, not synced: {', '.join(self.new_in_postgres)}"] if self.new_in_postgres else []
        parts += self.errors
        return "; ".join(parts) or "PostgreSQL, the catalog, the mirror and the mapping agree"


def schema_drift(
    conn: psycopg.Connection,
    table: SyncedTable,
    *,
    clickhouse: Any = None,
    es: Any = None,
) -> SchemaDrift:
    """PostgreSQL's table against the catalog, then each target store given a client against the catalog."""
    drift = SchemaDrift(table.name)
    columns = pg_store.live_columns(conn, table)
    drift.errors += pg_store.column_errors(table, columns)
    if not columns:
        return drift
    drift.new_in_postgres = sorted(set(columns) - {c.name for c in table.columns})
    clients = {CLICKHOUSE.name: clickhouse, ELASTICSEARCH.name: es}
    for store in targets_of(table):
        client = clients.get(store.name)
        if client is not None:
            drift.errors += store.schema_errors(client, table)
    return drift
