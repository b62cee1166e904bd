"""Schema drift: a synced table's columns in PostgreSQL, in the catalog, in its ClickHouse mirror and in its
search mapping, compared. A column PostgreSQL has and the catalog does not is a WARN (nothing breaks, the
column is just not synced); a catalog column that PostgreSQL, the mirror or the mapping lacks, or holds
with another type, is an ERROR (the transform or the apply will fail on it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, SyncedTable
from knowton_pipeline.lib.transform import CLICKHOUSE_DELETED_COLUMN, CLICKHOUSE_VERSION_COLUMN

Verdict = Literal["ok", "warn", "error"]

# What a catalog type is called by information_schema (data_type, or udt_name for arrays).
_PG_TYPES = {
    "text": "text",
    "int": "integer",
    "bigint": "bigint",
    "bool": "boolean",
    "numeric": "numeric",
    "timestamptz": "timestamp with time zone",
    "text[]": "_text",
    "jsonb": "jsonb",
}
# The mirror's type per catalog type (LowCardinality and Nullable unwrapped; Decimal's precision free).
_CH_TYPES = {
    "text": r"String",
    "int": r"Int32",
    "bigint": r"Int64",
    "bool": r"Bool|UInt8",
    "numeric": r"Decimal\(\d+, {scale}\)",
    "timestamptz": r"DateTime64\(6, 'UTC'\)",
    "text[]": r"Array\(String\)",
    "jsonb": r"String",
}
_ES_TYPES = {
    "int": {"integer", "long"},
    "bigint": {"long"},
    "bool": {"boolean"},
    "timestamptz": {"date", "date_nanos"},
}


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


def _unwrap(ch_type: str) -> str:
    for wrapper in ("LowCardinality", "Nullable"):
        m = re.fullmatch(rf"{wrapper}\((.*)\)", ch_type)
        if m:
            ch_type = m.group(1)
    return _unwrap(ch_type) if ch_type.startswith(("LowCardinality(", "Nullable(")) else ch_type


def postgres_columns(conn: psycopg.Connection, table: SyncedTable) -> dict[str, tuple[str, int | None]]:
    rows = conn.execute(
        "SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN udt_name ELSE data_type END, numeric_scale "
        "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (table.schema, table.name),
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def schema_drift(
    conn: psycopg.Connection,
    table: SyncedTable,
    *,
    clickhouse: Any = None,
    es: Any = None,
    database: str = CLICKHOUSE_DATABASE,
) -> SchemaDrift:
    drift = SchemaDrift(table.name)
    pg = postgres_columns(conn, table)
    if not pg:
        drift.errors.append(f"PostgreSQL has no table {table.qualified_name}")
        return drift
    catalog = {c.name: c for c in table.columns}
    drift.new_in_postgres = sorted(set(pg) - set(catalog))
    for c in table.columns:
        if c.name not in pg:
            drift.errors.append(f"PostgreSQL: column {c.name} was dropped (the catalog syncs it as {c.type})")
            continue
        found, scale = pg[c.name]
        if found != _PG_TYPES[c.type] or (c.type == "numeric" and scale != c.scale):
            shown = f"{found}({scale})" if found == "numeric" else found
            expected = f"numeric(scale {c.scale})" if c.type == "numeric" else _PG_TYPES[c.type]
            drift.errors.append(f"PostgreSQL: column {c.name} is {shown}, the catalog expects {expected}")
    if clickhouse is not None:
        rows = clickhouse.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": database, "t": table.clickhouse_table},
        ).result_rows
        mirror = {r[0]: r[1] for r in rows}
        if not mirror:
            drift.errors.append(f"ClickHouse: mirror {database}.{table.clickhouse_table} does not exist")
        else:
            for c in table.columns:
                found = mirror.get(c.target_name)
                pattern = _CH_TYPES[c.type].replace("{scale}", str(c.scale))
                if found is None:
                    drift.errors.append(f"ClickHouse: mirror has no column {c.target_name} (for {c.name})")
                elif not re.fullmatch(pattern, _unwrap(found)):
                    drift.errors.append(f"ClickHouse: {c.target_name} is {found}, expected {pattern}")
            for meta in (CLICKHOUSE_VERSION_COLUMN, CLICKHOUSE_DELETED_COLUMN):
                if meta not in mirror:
                    drift.errors.append(f"ClickHouse: mirror has no {meta} column")
    if es is not None and table.elasticsearch_index:
        mappings = es.indices.get_mapping(index=table.elasticsearch_index)
        for index, body in mappings.items():
            properties = body["mappings"].get("properties", {})
            for c in table.columns:
                if not c.in_elasticsearch:
                    continue
                field_ = properties.get(c.target_name)
                if field_ is None:
                    drift.errors.append(f"Elasticsearch: {index} maps no field {c.target_name} (for {c.name})")
                elif c.type in _ES_TYPES and field_.get("type") not in _ES_TYPES[c.type]:
                    drift.errors.append(
                        f"Elasticsearch: {index} maps {c.target_name} as {field_.get('type')}, "
                        f"expected {' or '.join(sorted(_ES_TYPES[c.type]))}"
                    )
    return drift
