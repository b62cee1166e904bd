"""Reading current rows from PostgreSQL, the source of truth, for backfills and enriched documents.

Rows come back keyed by PostgreSQL column name with psycopg's Python types, the same shape the
Debezium decoder produces, so both feed the one transform.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from knowton_pipeline.catalog import SyncedTable, table
from knowton_pipeline.lib.canonical import postgres_derived_sql
from knowton_pipeline.lib.sync.writers import WriteItem

CONTENT = table("Content")
USER = table("User")
PURCHASE = table("Purchase")


def select_columns(t: SyncedTable, alias: str = "t") -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c.name)) for c in t.columns)


def qualified(t: SyncedTable) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(t.schema), sql.Identifier(t.name))


def enriched_query(t: SyncedTable, where: sql.Composable) -> sql.Composed:
    """Rows of `t` (alias `t` in `where`) with what its search document adds from other tables: each of the
    catalog's derived fields, computed by its definition, the one the reconciliation's canonical row uses."""
    derived = [sql.SQL("{} AS {}").format(postgres_derived_sql(f, "t"), sql.Identifier(f.name)) for f in t.derived]
    return sql.SQL("SELECT {cols} FROM {tbl} t WHERE {where}").format(
        cols=sql.SQL(", ").join([select_columns(t), *derived]), tbl=qualified(t), where=where
    )


def enriched_content_query(where: sql.Composable) -> sql.Composed:
    """Content rows with what the search document adds: the creator's username and the sales count."""
    return enriched_query(CONTENT, where)


ENRICHMENT_FIELDS = tuple(f.name for f in CONTENT.derived)


def split_enrichment(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    enrichment = {k: row.pop(k) for k in ENRICHMENT_FIELDS if k in row}
    return row, enrichment


def content_items(
    conn: psycopg.Connection, ids: Iterable[int], *, version: int, sources: dict[int, tuple[Any, ...]] | None = None
) -> list[WriteItem]:
    """Current Content documents for `ids` (call inside `consistent_snapshot`, versioned with its LSN).

    An id no longer in PostgreSQL becomes a versioned tombstone.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return []
    sources = sources or {}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(enriched_content_query(sql.SQL("t.id = ANY(%s)")), (wanted,))
        found = {r["id"]: r for r in cur.fetchall()}
    items = []
    for content_id in wanted:
        src = sources.get(content_id, ())
        if content_id in found:
            row, enrichment = split_enrichment(found[content_id])
            items.append(WriteItem(CONTENT, row, version, False, src, enrichment))
        else:
            items.append(WriteItem(CONTENT, {"id": content_id}, version, True, src))
    return items


def contents_by_creators(conn: psycopg.Connection, addresses: Sequence[str]) -> list[tuple[int, str]]:
    """(content id, creator) of every Content row created by one of `addresses`."""
    if not addresses:
        return []
    rows = conn.execute(
        sql.SQL("SELECT id, creator FROM {} WHERE creator = ANY(%s)").format(qualified(CONTENT)), (list(addresses),)
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


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
