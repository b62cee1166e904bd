"""Repair: re-sync exactly the differing keys of a reconciliation from PostgreSQL through the one transform.

The rows are read in one consistent snapshot and written with its LSN as their version, like a backfill:
a repair can never overwrite a change CDC applies later (that change carries a higher LSN), and a key
PostgreSQL no longer has becomes a versioned tombstone. Afterwards the keys are compared again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.reconcile.bisect import Key
from knowton_pipeline.lib.reconcile.engine import build_reconciler
from knowton_pipeline.lib.stores import TargetStore, WriteItem, target_store
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import document_items, qualified, select_columns


class RepairError(RuntimeError):
    """Some keys could not be written (the message names them); the others were."""


@dataclass
class RepairResult:
    table: str
    target: str
    requested: int
    written: int = 0
    tombstones: int = 0
    stale: int = 0  # the target already held a newer version: CDC got there first
    snapshot_lsn: int = 0
    still_different: list[Key] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return not self.still_different

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "target": self.target,
            "requested": self.requested,
            "written": self.written,
            "tombstones": self.tombstones,
            "stale": self.stale,
            "snapshot_lsn": self.snapshot_lsn,
            "still_different": [str(k) for k in self.still_different[:50]],
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
        }


def _items(
    conn: psycopg.Connection, table: SyncedTable, store: TargetStore, keys: Sequence[Key], version: int
) -> list[WriteItem]:
    if store.shape == "document" and table.derived:
        return document_items(conn, table, keys, version=version)
    [key] = table.key
    query = sql.SQL("SELECT {cols} FROM {rel} t WHERE t.{key} = ANY(%s)").format(
        cols=select_columns(table), rel=qualified(table), key=sql.Identifier(key)
    )
    with conn.cursor(row_factory=dict_row) as cur:
        found = {r[key]: r for r in cur.execute(query, (list(keys),)).fetchall()}
    return [
        WriteItem(table, found[k], version, False) if k in found else WriteItem(table, {key: k}, version, True)
        for k in keys
    ]


def repair_keys(
    conn: psycopg.Connection,
    table: SyncedTable,
    target: str,
    keys: Sequence[Key],
    *,
    client: Any,
    chunk: int = 2000,
) -> RepairResult:
    """Re-sync `keys` of `table` into the target store named `target` (through its `client`) from one PostgreSQL
    snapshot, then re-verify them. `conn` must have no open transaction (the snapshot opens its own)."""
    store = target_store(target)
    if not store.holds(table):
        raise ValueError(f"{table.name} is not kept in {store.title}")
    t0 = time.monotonic()
    keys = sorted(set(keys))
    result = RepairResult(table.name, store.name, len(keys))
    writer = store.writer(client)
    failed: list[str] = []
    with consistent_snapshot(conn) as version:
        result.snapshot_lsn = version
        for i in range(0, len(keys), chunk):
            items = _items(conn, table, store, keys[i : i + chunk], version)
            outcome = writer.write(items)
            result.written += outcome.written
            result.stale += outcome.stale
            result.tombstones += sum(1 for it in items if it.deleted)
            failed += [f"{[it.row.get(k) for k in table.key]}: {exc}" for it, exc in outcome.poison]
    store.make_visible(client, table)
    if failed:
        raise RepairError(
            f"{len(failed)} key(s) of {table.name} could not be written to {store.name}: {'; '.join(failed[:5])}"
        )
    # Re-verify exactly these keys, with the reconciler's own comparison.
    reconciler = build_reconciler(table, store.name, conn=conn, client=client)
    result.still_different = reconciler.differing_keys(keys)
    conn.rollback()
    result.seconds = time.monotonic() - t0
    return result
