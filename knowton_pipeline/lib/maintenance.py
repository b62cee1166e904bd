"""Housekeeping that keeps the pipeline the same size when its data is: tombstones past a safety window are
purged from every target store, and the project's own `ops.*` history is pruned by age.

Versions are WAL positions, not times. To give a delete an age, each maintenance run notes the current WAL
position in `ops.wal_marks`; the purge horizon is the newest position noted at least `tombstone_window` ago, and
every delete versioned below it is older than the window. A write versioned below the horizon could resurrect a
purged delete (the store no longer holds the tombstone that would refuse it), so the apply and the DLQ replay
refuse such writes (`check_not_below_horizon`); a backfill or a repair is versioned at the current position and
is never below it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg

from knowton_pipeline.catalog import TABLES
from knowton_pipeline.lib.stores import TARGETS


class BelowPurgeHorizonError(ValueError):
    """A write older than the tombstone purge horizon: applying it could bring back a purged delete."""


@dataclass(frozen=True)
class RetentionPolicy:
    # Longer than any replay, backfill or repair reaches back (the DLQ replay parks a record after its last
    # attempt within hours; Kafka keeps the cdc-* topics 7 days by default).
    tombstone_window: timedelta = timedelta(days=7)
    reconcile_history: timedelta = timedelta(days=90)  # ops.reconcile_runs and their ops.reconcile_diffs
    backfill_progress: timedelta = timedelta(days=30)
    # Only parked DLQ records an operator resolved: an unresolved one is kept however old it is.
    resolved_dlq: timedelta = timedelta(days=30)
    purge_log: timedelta = timedelta(days=365)

    def __post_init__(self) -> None:
        for name in ("tombstone_window", "reconcile_history", "backfill_progress", "resolved_dlq", "purge_log"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"retention {name} must be positive, got {getattr(self, name)}")


@dataclass
class MaintenanceReport:
    horizon: int | None = None  # None: no WAL position is old enough yet, nothing was purged
    purged: dict[str, dict[str, int]] = field(default_factory=dict)  # store -> table -> keys removed
    pruned: dict[str, int] = field(default_factory=dict)  # ops table -> rows removed

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"purge_horizon": self.horizon or 0}
        for store in TARGETS:
            out[f"tombstones_purged_{store}"] = sum(self.purged.get(store, {}).values())
        for name, n in self.pruned.items():
            out[f"pruned_{name.removeprefix('ops.')}"] = n
        return out


def note_wal_position(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "INSERT INTO ops.wal_marks (noted_at, lsn) VALUES (now(), pg_current_wal_lsn() - '0/0'::pg_lsn) "
        "ON CONFLICT (noted_at) DO UPDATE SET lsn = EXCLUDED.lsn RETURNING lsn"
    ).fetchone()
    assert row is not None
    return int(row[0])


def horizon_for(conn: psycopg.Connection, window: timedelta) -> int | None:
    """The newest WAL position noted at least `window` ago, None when there is none yet."""
    row = conn.execute("SELECT max(lsn) FROM ops.wal_marks WHERE noted_at <= now() - %s", (window,)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def purge_horizon(conn: psycopg.Connection) -> int:
    """The highest version below which tombstones were purged (0: never)."""
    row = conn.execute("SELECT coalesce(max(below_version), 0) FROM ops.purges").fetchone()
    return int(row[0]) if row else 0


def check_not_below_horizon(version: int, horizon: int, what: str) -> None:
    if version < horizon:
        raise BelowPurgeHorizonError(
            f"{what} is versioned {version}, below the tombstone purge horizon {horizon}: deletes older than the "
            "retention window were purged, so this write could bring a deleted row back. It is refused; re-sync the "
            "key from PostgreSQL instead (the repair job, or a backfill), which writes at the current position."
        )


def purge_tombstones(
    conn: psycopg.Connection,
    clients: Mapping[str, Any],
    window: timedelta,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[int | None, dict[str, dict[str, int]]]:
    """Purge, in every target store given a client, the deletes older than `window`. Returns the horizon used
    (None: nothing old enough) and the keys removed per store and table."""
    say = on_progress or (lambda _m: None)
    horizon = horizon_for(conn, window)
    if horizon is None:
        say(f"no WAL position noted {window} ago yet: nothing is old enough to purge")
        return None, {}
    purged: dict[str, dict[str, int]] = {}
    for store in TARGETS.values():
        client = clients.get(store.name)
        if client is None:
            continue
        for t in TABLES:
            if not store.holds(t):
                continue
            # Recorded before the purge: from now on nothing below the horizon may be written.
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO ops.purges (store, table_name, below_version, removed) VALUES (%s, %s, %s, 0) "
                    "RETURNING id",
                    (store.name, t.name, horizon),
                ).fetchone()
            assert row is not None
            removed = store.purge_tombstones(client, t, horizon)
            conn.execute("UPDATE ops.purges SET removed = %s WHERE id = %s", (removed, row[0]))
            purged.setdefault(store.name, {})[t.name] = removed
            say(f"{store.name} {store.location(t)}: {removed} deleted key(s) older than version {horizon} purged")
    return horizon, purged


def prune_history(conn: psycopg.Connection, policy: RetentionPolicy) -> dict[str, int]:
    """Remove the project's own history past its age; returns the rows removed per table."""
    statements = {
        # Their differing keys go with them (ON DELETE CASCADE).
        "ops.reconcile_runs": (
            "DELETE FROM ops.reconcile_runs WHERE started_at < now() - %s",
            policy.reconcile_history,
        ),
        "ops.backfill_progress": (
            "DELETE FROM ops.backfill_progress WHERE finished_at < now() - %s",
            policy.backfill_progress,
        ),
        "ops.dlq_parked": (
            "DELETE FROM ops.dlq_parked WHERE resolved_at IS NOT NULL AND resolved_at < now() - %s",
            policy.resolved_dlq,
        ),
        # The horizon is the highest below_version ever recorded: the newest purge of each store and table stays.
        "ops.purges": (
            "DELETE FROM ops.purges p WHERE purged_at < now() - %s AND EXISTS (SELECT 1 FROM ops.purges q "
            "WHERE q.store = p.store AND q.table_name = p.table_name AND q.below_version >= p.below_version "
            "AND q.id > p.id)",
            policy.purge_log,
        ),
        # Marks older than the window are needed only for the newest of them (the next horizon).
        "ops.wal_marks": (
            "DELETE FROM ops.wal_marks WHERE noted_at < (SELECT max(noted_at) FROM ops.wal_marks "
            "WHERE noted_at <= now() - %s)",
            policy.tombstone_window,
        ),
    }
    removed: dict[str, int] = {}
    for name, (statement, age) in statements.items():
        with conn.transaction():
            removed[name] = conn.execute(statement, (age,)).rowcount
    return removed


def run_maintenance(
    conn: psycopg.Connection,
    clients: Mapping[str, Any],
    policy: RetentionPolicy | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> MaintenanceReport:
    """Note the WAL position, purge tombstones past the window, prune the history. `conn` in autocommit mode."""
    policy = policy or RetentionPolicy()
    report = MaintenanceReport()
    note_wal_position(conn)
    report.horizon, report.purged = purge_tombstones(conn, clients, policy.tombstone_window, on_progress)
    report.pruned = prune_history(conn, policy)
    return report
