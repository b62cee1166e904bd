"""Reconciliation results kept in PostgreSQL (ops.reconcile_runs, ops.reconcile_diffs), to query after the run
and for `repair` to act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.reconcile.bisect import Key
from knowton_pipeline.lib.reconcile.engine import ReconcileResult

# Keys stored per reconciliation; a result with more (a target emptied by accident) keeps its counts and a prefix.
MAX_RECORDED_KEYS = 100_000


@dataclass
class RecordedDifferences:
    reconcile_id: int
    table: str
    target: str
    keys: dict[str, list[str]] = field(default_factory=dict)  # kind -> keys as text

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.keys.values())

    def all_keys(self) -> list[str]:
        return [k for kind in ("missing", "extra", "different") for k in self.keys.get(kind, [])]


def key_text(key: Key) -> str:
    return "|".join(map(str, key)) if isinstance(key, tuple) else str(key)


def key_value(table: SyncedTable, text: str) -> Key:
    """A recorded key back as the key column's Python value."""
    column = table.column(table.key[0])
    return int(text) if column.type in ("int", "bigint") else text


def record_result(
    conn: psycopg.Connection, result: ReconcileResult, *, started_at: datetime, dagster_run_id: str | None = None
) -> int:
    """Store one reconciliation and its differing keys (up to MAX_RECORDED_KEYS); returns its id."""
    d = result.differences
    rows: list[tuple[str, str, list[str]]] = [(key_text(k), "missing", []) for k in d.missing_in_target]
    rows += [(key_text(k), "extra", []) for k in d.extra_in_target]
    rows += [(key_text(k), "different", cols) for k, cols in d.different.items()]
    rows = rows[:MAX_RECORDED_KEYS]
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO ops.reconcile_runs (dagster_run_id, table_name, target, mode, started_at, seconds, "
            "source_rows, target_rows, missing, extra, different, in_flight, rows_compared, keys_recorded, clean) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                dagster_run_id,
                result.table,
                result.target,
                result.mode,
                started_at,
                result.seconds,
                result.source_rows,
                result.target_rows,
                len(d.missing_in_target),
                len(d.extra_in_target),
                len(d.different),
                len(result.in_flight),
                result.stats.rows_compared,
                len(rows),
                result.clean,
            ),
        ).fetchone()
        assert row is not None
        reconcile_id = int(row[0])
        if rows:
            with conn.cursor().copy("COPY ops.reconcile_diffs (reconcile_id, key, kind, columns) FROM STDIN") as copy:
                for key, kind, cols in rows:
                    copy.write_row((reconcile_id, key, kind, cols))
    return reconcile_id


def load_differences(
    conn: psycopg.Connection,
    *,
    reconcile_id: int | None = None,
    table: str | None = None,
    target: str | None = None,
    unrepaired_only: bool = True,
) -> RecordedDifferences:
    """The keys of one reconciliation: by id, or the latest one of `table` with `target`."""
    if reconcile_id is None:
        if table is None or target is None:
            raise ValueError("name a reconciliation id, or a table and a target")
        row = conn.execute(
            "SELECT id FROM ops.reconcile_runs WHERE table_name = %s AND target = %s ORDER BY id DESC LIMIT 1",
            (table, target),
        ).fetchone()
        if row is None:
            raise ValueError(f"no reconciliation of {table} with {target} is recorded")
        reconcile_id = int(row[0])
    head = conn.execute("SELECT table_name, target FROM ops.reconcile_runs WHERE id = %s", (reconcile_id,)).fetchone()
    if head is None:
        raise ValueError(f"no reconciliation {reconcile_id} is recorded")
    out = RecordedDifferences(reconcile_id, head[0], head[1])
    rows = conn.execute(
        "SELECT kind, key FROM ops.reconcile_diffs WHERE reconcile_id = %s"
        + (" AND repaired_at IS NULL" if unrepaired_only else "")
        + " ORDER BY kind, key",
        (reconcile_id,),
    ).fetchall()
    for kind, key in rows:
        out.keys.setdefault(kind, []).append(key)
    return out


def mark_repaired(
    conn: psycopg.Connection,
    reconcile_id: int,
    keys: Sequence[Key],
    still_different: Sequence[Key],
    reason: str = "repair requested",
) -> None:
    """Record that `keys` were re-synced and why, and which of them the re-check found equal."""
    still = {key_text(k) for k in still_different}
    verified = {key_text(k): key_text(k) not in still for k in keys}
    with conn.transaction():
        conn.cursor().executemany(
            "UPDATE ops.reconcile_diffs SET repaired_at = now(), verified = %s, repair_reason = %s "
            "WHERE reconcile_id = %s AND key = %s",
            [(ok, reason, reconcile_id, key) for key, ok in verified.items()],
        )


def track_incident(conn: psycopg.Connection, subject: str, drifting: bool, detail: str) -> float | None:
    """Open an incident for `subject` when it is drifting and none is open; close the open one when it is not.
    Returns the time to heal in seconds when this call closed an incident, else None. `conn` in autocommit."""
    if drifting:
        conn.execute(
            "INSERT INTO ops.incidents (subject, detail) VALUES (%s, %s) ON CONFLICT DO NOTHING", (subject, detail)
        )
        return None
    row = conn.execute(
        "UPDATE ops.incidents SET closed_at = now() WHERE subject = %s AND closed_at IS NULL "
        "RETURNING extract(epoch FROM closed_at - opened_at)",
        (subject,),
    ).fetchone()
    return float(row[0]) if row else None


def open_incident(conn: psycopg.Connection, subject: str) -> str | None:
    """The detail of the open incident of `subject`, None when there is none."""
    row = conn.execute(
        "SELECT detail FROM ops.incidents WHERE subject = %s AND closed_at IS NULL", (subject,)
    ).fetchone()
    return row[0] if row else None
