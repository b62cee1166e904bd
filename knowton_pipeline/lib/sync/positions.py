"""The newest source position the stores hold, against the source's own: a source that moved backwards
(a restore into a new cluster, whose LSNs start lower) would make every write look stale and be refused
without a sound, so it is detected here and stops the sync with what to do.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

RESTORE_PROCEDURE = (
    "The stores hold versions from a source whose WAL went further than this one: PostgreSQL was restored or "
    "replaced (its LSNs start lower), so every change would be refused as stale. Stop the sinks, rebuild the "
    "stores from this source (drop and re-create the ClickHouse mirrors with `knowton schema apply` and backfill "
    "them, run `rebuild_search_index` for each index), reset the sinks' consumer groups (`knowton-sink-clickhouse`, "
    "`knowton-sink-elasticsearch`) to the topics' "
    "end and re-create the Debezium slot and connector (see docs/architecture.md, 'A source that moved "
    "backwards')."
)


class SourceBehindStoresError(RuntimeError):
    """The stores hold a version above the source's current WAL position."""


def source_position(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def check_source_not_behind(source: int, newest: Mapping[str, Mapping[str, int]]) -> None:
    """Raise `SourceBehindStoresError` when any store (store -> table -> newest version) is ahead of `source`."""
    ahead = [
        f"{store} {table} at {version}"
        for store, tables in newest.items()
        for table, version in tables.items()
        if version > source
    ]
    if ahead:
        raise SourceBehindStoresError(
            f"the source's WAL position is {source}, but {', '.join(ahead)}. {RESTORE_PROCEDURE}"
        )
