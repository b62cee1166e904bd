"""A PostgreSQL read snapshot paired with the version its rows are written with.

The version is ordered by commit against the streamed changes (the argument is in `lib/versions.py`): every
change the snapshot misses carries a higher version and wins, whatever its own LSN.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from knowton_pipeline.lib.versions import anchor_position


@contextmanager
def consistent_snapshot(conn: psycopg.Connection, *, lock_timeout_seconds: float = 10.0) -> Iterator[int]:
    """Commit the anchor, then open a REPEATABLE READ transaction on `conn` and yield its rows' version.

    Open transactions are not waited for: a transaction the snapshot misses commits after the anchor, and its
    streamed changes are versioned above the snapshot's rows. The anchor's write waits at most
    `lock_timeout_seconds` for the heartbeat row's lock (a session holding it idle in transaction fails the
    snapshot with a clear error instead of stalling it).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("consistent_snapshot needs a connection with no open transaction")
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        conn.execute(f"SET lock_timeout = '{int(lock_timeout_seconds * 1000)}ms'")
        try:
            version = anchor_position(conn)
        finally:
            conn.execute("RESET lock_timeout")
        conn.autocommit = False
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SELECT 1")  # the snapshot is taken by the transaction's first statement
        try:
            yield version
        finally:
            conn.rollback()
    finally:
        conn.autocommit = autocommit
