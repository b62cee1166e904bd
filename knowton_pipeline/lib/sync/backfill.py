"""Backfill: re-sync rows of chosen days from PostgreSQL through the one transform.

Rows are read in one consistent snapshot and written with its LSN as their version, so a backfill
racing with live CDC never overwrites a newer change, and never brings back a deleted row (a
deleted row is not in the snapshot, and the delete's tombstone carries a higher version).
Streaming (server-side cursor, fixed-size chunks) keeps memory bounded whatever the range.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import split_enrichment, stream_rows
from knowton_pipeline.lib.sync.writers import ClickHouseWriter, ElasticsearchWriter, WriteItem
from knowton_pipeline.lib.transform import document_id


class BackfillError(RuntimeError):
    """Some rows could not be written; the message lists their keys (the others were written)."""


@dataclass
class BackfillStats:
    rows: int = 0
    written: int = 0
    stale: int = 0
    snapshot_lsn: int = 0
    seconds: float = 0.0
    failed_keys: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def backfill_range(
    conn: psycopg.Connection,
    table: SyncedTable,
    start: datetime,
    end: datetime,
    writer: ClickHouseWriter | ElasticsearchWriter,
    *,
    chunk: int = 5000,
    on_progress: Callable[[BackfillStats], None] | None = None,
) -> BackfillStats:
    """Write every row of `table` created in [start, end) to one target, versioned at the snapshot."""
    if table.created_at is None:
        raise ValueError(f"{table.name} has no creation-time column to backfill by")
    stats = BackfillStats()
    t0 = time.monotonic()
    where = sql.SQL("t.{created} >= %s AND t.{created} < %s").format(created=sql.Identifier(table.created_at))
    with consistent_snapshot(conn) as lsn:
        stats.snapshot_lsn = lsn
        for rows in stream_rows(conn, table, where, (start, end), chunk=chunk):
            items = []
            for raw in rows:
                row, enrichment = split_enrichment(raw)
                items.append(
                    WriteItem(
                        table, row, lsn, False, (document_id(table, [row[k] for k in table.key]),), enrichment or None
                    )
                )
            outcome = writer.write(items)
            stats.rows += len(rows)
            stats.written += outcome.written
            stats.stale += outcome.stale
            stats.failed_keys += [str(item.sources[0]) for item, _ in outcome.poison]
            stats.seconds = time.monotonic() - t0
            if on_progress:
                on_progress(stats)
    stats.seconds = time.monotonic() - t0
    if stats.failed_keys:
        sample = ", ".join(stats.failed_keys[:20])
        raise BackfillError(f"{len(stats.failed_keys)} row(s) of {table.name} could not be written (keys: {sample})")
    return stats
