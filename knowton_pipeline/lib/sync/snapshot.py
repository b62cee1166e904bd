"""A PostgreSQL read snapshot paired with an LSN that is safe to version its rows with.

Every change the snapshot holds has a lower LSN than the returned one and every change it misses a
higher one, so a row written with that version can never hide a change the snapshot did not see:
that change's own event carries a higher LSN and wins (DESIGN.md principle 3).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


class SnapshotTimeoutError(RuntimeError):
    """Transactions open at the snapshot point did not finish in time."""


@contextmanager
def consistent_snapshot(conn: psycopg.Connection, *, wait_seconds: float = 60.0) -> Iterator[int]:
    """Open a REPEATABLE READ transaction on `conn` and yield the LSN its rows may be versioned with.

    pg_current_wal_lsn() is read first. A transaction that wrote its commit record before that point
    may still be invisible (it becomes visible a moment after its WAL flush), so the in-progress
    transactions of a snapshot taken just after are waited for before the real snapshot is taken.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("consistent_snapshot needs a connection with no open transaction")
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]  # type: ignore[index]
        xids = [r[0] for r in conn.execute("SELECT pg_snapshot_xip(pg_current_snapshot())::text").fetchall()]
        deadline = time.monotonic() + wait_seconds
        while xids:
            rows = conn.execute(
                "SELECT x FROM unnest(%s::text[]) AS x WHERE pg_xact_status(x::xid8) = 'in progress'", (xids,)
            ).fetchall()
            xids = [r[0] for r in rows]
            if xids and time.monotonic() > deadline:
                raise SnapshotTimeoutError(
                    f"{len(xids)} transaction(s) open since before the snapshot did not finish within "
                    f"{wait_seconds:.0f} s; a long-running transaction blocks a consistent backfill"
                )
            if xids:
                time.sleep(0.01)
        conn.autocommit = False
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SELECT 1")  # the snapshot is taken by the transaction's first statement
        try:
            # A change the snapshot misses starts at or after `lsn` (the very next WAL record can
            # start exactly there), and one it holds starts well before it: one byte less orders
            # the snapshot strictly between them, so a tie can never let a stale row win.
            yield int(lsn) - 1
        finally:
            conn.rollback()
    finally:
        conn.autocommit = autocommit
