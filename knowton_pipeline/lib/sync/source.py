"""Reading current rows from PostgreSQL, the source of truth, for backfills and enriched documents.

Rows come back keyed by PostgreSQL column name with psycopg's Python types, the same shape the
Debezium decoder produces, so both feed the one transform.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.postgres import derived_sql


def select_columns(t: SyncedTable, alias: str = "t") -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c.name)) for c in t.columns)


def qualified(t: SyncedTable) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(t.schema), sql.Identifier(t.name))


def enriched_query(t: SyncedTable, where: sql.Composable) -> sql.Composed:
    """Rows of `t` (alias `t` in `where`) with what its search document adds from other tables: each of the
    catalog's derived fields, computed by its definition, the one the reconciliation's canonical row uses."""
    derived = [sql.SQL("{} AS {}").format(derived_sql(f, "t"), sql.Identifier(f.name)) for f in t.derived]
    return sql.SQL("SELECT {cols} FROM {tbl} t WHERE {where}").format(
        cols=sql.SQL(", ").join([select_columns(t), *derived]), tbl=qualified(t), where=where
    )


def split_enrichment(t: SyncedTable, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An enriched row as the row itself and its derived fields (the `enrichment` of a `WriteItem`)."""
    enrichment = {f.name: row.pop(f.name) for f in t.derived if f.name in row}
    return row, enrichment


def document_items(
    conn: psycopg.Connection,
    t: SyncedTable,
    keys: Iterable[Any],
    *,
    version: int,
    sources: Mapping[Any, tuple[Any, ...]] | None = None,
) -> list[WriteItem]:
    """The current search documents of `t` for `keys`, derived fields included (call inside `consistent_snapshot`,
    versioned with its position). A key no longer in PostgreSQL becomes a versioned tombstone. `sources` maps a key
    to what to dead-letter if its item turns out poison."""
    wanted = sorted(set(keys))
    if not wanted:
        return []
    [key] = t.key
    sources = sources or {}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(enriched_query(t, sql.SQL("t.{} = ANY(%s)").format(sql.Identifier(key))), (wanted,))
        found = {r[key]: r for r in cur.fetchall()}
    items = []
    for k in wanted:
        src = sources.get(k, ())
        if k in found:
            row, enrichment = split_enrichment(t, found[k])
            items.append(WriteItem(t, row, version, False, src, enrichment or None))
        else:
            items.append(WriteItem(t, {key: k}, version, True, src))
    return items


def linked_keys(conn: psycopg.Connection, t: SyncedTable, column: str, values: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(key, value of `column`) of every row of `t` whose `column` is one of `values`."""
    if not values:
        return []
    [key] = t.key
    query = sql.SQL("SELECT t.{key}, t.{col} FROM {rel} t WHERE t.{col} = ANY(%s)").format(
        key=sql.Identifier(key), col=sql.Identifier(column), rel=qualified(t)
    )
    return [(r[0], r[1]) for r in conn.execute(query, (list(values),)).fetchall()]


def all_keys(conn: psycopg.Connection, t: SyncedTable) -> list[Any]:
    [key] = t.key
    query = sql.SQL("SELECT t.{key} FROM {rel} t").format(key=sql.Identifier(key), rel=qualified(t))
    return [r[0] for r in conn.execute(query).fetchall()]


def stream_rows(
    conn: psycopg.Connection,
    t: SyncedTable,
    where: sql.Composable,
    params: Sequence[Any],
    *,
    chunk: int = 5000,
    enriched: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Rows of `t` matching `where`, in chunks, through a server-side cursor (bounded memory).

    `enriched` adds what the table's search document shows from other tables (its derived fields)."""
    if enriched and t.derived:
        query = enriched_query(t, where)
    else:
        query = sql.SQL("SELECT {cols} FROM {tbl} t WHERE {where}").format(
            cols=select_columns(t), tbl=qualified(t), where=where
        )
    with conn.cursor(name=f"knowton_backfill_{t.name.lower()}", row_factory=dict_row) as cur:
        cur.itersize = chunk
        cur.execute(query, params)
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                return
            yield rows
