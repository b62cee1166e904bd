"""A table wider than PostgreSQL passes arguments to one function (100): the backfill's COPY spellings of its mirror
rows and search documents (`mirror_rows_copy_sql`, `document_rows_copy_sql`) still hold every column, as the row
transforms write them, instead of failing with "cannot pass more than 100 arguments to a function"."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from knowton_pipeline.catalog import Column, SyncedTable
from knowton_pipeline.lib.stores.postgres import (
    MOST_FUNCTION_ARGUMENTS,
    DocumentRecords,
    MirrorRecords,
    document_rows_copy_sql,
    mirror_rows_copy_sql,
)
from knowton_pipeline.lib.transform import ES_METADATA_FIELDS, clickhouse_columns, to_clickhouse_row, to_es_document

PG_TYPES = {
    "text": "text",
    "int": "integer",
    "bigint": "bigint",
    "numeric": "numeric(12, 2)",
    "timestamptz": "timestamptz",
    "text[]": "text[]",
    "bool": "boolean",
    "jsonb": "jsonb",
}
KINDS = ("text", "int", "bigint", "numeric", "timestamptz", "text[]", "bool", "jsonb")
WIDTH = 2 * MOST_FUNCTION_ARGUMENTS + 10  # more than two calls' worth of mirror values and of document pairs


def wide_table(name: str) -> SyncedTable:
    columns = [Column("id", "bigint")]
    for i in range(WIDTH):
        kind = KINDS[i % len(KINDS)]
        columns.append(Column(f"c{i}", kind, nullable=True, scale=2 if kind == "numeric" else None))
    return SyncedTable(
        name=name,
        key=("id",),
        columns=tuple(columns),
        clickhouse_table=name.lower(),
        elasticsearch_index=name.lower(),
        description="a table wider than one PostgreSQL function call",
        schema="ops",
        created_at=None,
        updated_at=None,
    )


def value(kind: str, row: int, i: int) -> Any:
    if (row + i) % 5 == 0:
        return None
    return {
        "text": f'row {row} "col" {i} \\ é ✓',
        "int": -(row * 1000 + i),
        "bigint": 2**62 + row + i,  # beyond a double: exact only if no step reads it as one
        "numeric": Decimal(f"{row}{i}.10"),
        "timestamptz": datetime(2026, 11, 24, 5, row, i % 60, 123_456, tzinfo=UTC),
        "text[]": ["a", f"b,{i}", 'q"uote'],
        "bool": (row + i) % 2 == 0,
        "jsonb": Jsonb({"n": i, "list": [row, "x", 1.5], "text": f"é {i}"}),  # after the JSON built in parts
    }[kind]


@pytest.fixture
def wide(pg: psycopg.Connection) -> Iterator[tuple[SyncedTable, sql.Identifier]]:
    synced = wide_table(f"Wide{uuid.uuid4().hex[:8]}")
    relation = sql.Identifier("ops", synced.name.lower())
    pg.execute(
        sql.SQL("CREATE TABLE {} ({})").format(
            relation,
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(PG_TYPES[c.type])) for c in synced.columns
            ),
        )
    )
    try:
        for row in range(1, 4):
            values = [row, *(value(c.type, row, i) for i, c in enumerate(synced.columns[1:]))]
            pg.execute(
                sql.SQL("INSERT INTO {} VALUES ({})").format(
                    relation, sql.SQL(", ").join(sql.Placeholder() * len(values))
                ),
                values,
            )
        yield synced, relation
    finally:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(relation))


def read_rows(pg: psycopg.Connection, relation: sql.Identifier) -> dict[int, dict[str, Any]]:
    with pg.cursor(row_factory=dict_row) as cur:
        return {r["id"]: r for r in cur.execute(sql.SQL("SELECT * FROM {}").format(relation))}


def copied(pg: psycopg.Connection, query: sql.Composable, key: Callable[[bytes], Any]) -> dict[Any, bytes]:
    """The COPY's records by the key of their row."""
    with pg.cursor() as cur, cur.copy(query) as copy:
        return {key(bytes(r)): bytes(r) for r in copy}


def as_json(v: Any) -> Any:
    """A mirror value as the COPY's JSON line carries it (ClickHouse reads timestamps from this text)."""
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return v


def test_a_wide_tables_mirror_rows_are_spelled_in_full_as_the_row_transform_writes_them(
    pg: psycopg.Connection, wide: tuple[SyncedTable, sql.Identifier]
) -> None:
    synced, relation = wide
    reader = MirrorRecords(synced)
    records = copied(pg, mirror_rows_copy_sql(synced, sql.SQL("true"), 7, relation=relation), reader.key)
    rows = read_rows(pg, relation)
    assert sorted(records) == sorted(rows)
    for key, record in records.items():
        # The line holds the columns in `reader.columns` order (jsonb last), the transform in the mirror's.
        got = dict(zip(reader.columns, json.loads(reader.line(record), parse_float=Decimal), strict=True))
        row = to_clickhouse_row(synced, rows[key], version=7, deleted=False)
        expected = dict(zip(clickhouse_columns(synced), map(as_json, row), strict=True))
        assert len(got) == len(synced.columns) + 2
        assert got == expected


def test_a_wide_tables_search_documents_are_spelled_in_full_as_the_document_transform_writes_them(
    pg: psycopg.Connection, wide: tuple[SyncedTable, sql.Identifier]
) -> None:
    synced, relation = wide
    reader = DocumentRecords(synced)
    records = copied(pg, document_rows_copy_sql(synced, sql.SQL("true"), relation=relation), reader.key)
    rows = read_rows(pg, relation)
    assert sorted(records) == sorted(rows)
    indexed_at = datetime(2026, 12, 4, tzinfo=UTC)
    for key, record in records.items():
        expected = to_es_document(synced, rows[key], version=7, deleted=False, indexed_at=indexed_at)
        fields = reader.fields(record)
        assert len(fields) == len(synced.columns)
        assert fields == {k: v for k, v in expected.items() if k not in ES_METADATA_FIELDS}
