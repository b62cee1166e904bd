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
from knowton_pipeline.lib.reconcile.engine import TARGETS, build_reconciler
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import content_items, qualified, select_columns
from knowton_pipeline.lib.sync.writers import ClickHouseWriter, ElasticsearchWriter, WriteItem


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
    conn: psycopg.Connection, table: SyncedTable, target: str, keys: Sequence[Key], version: int
) -> list[WriteItem]:
    if target == "elasticsearch" and table.name == "Content":
        return content_items(conn, [int(k) for k in keys], version=version)
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
    clickhouse: Any = None,
    es: Any = None,
    chunk: int = 2000,
) -> RepairResult:
    """Re-sync `keys` of `table` into `target` from one PostgreSQL snapshot, then re-verify them.

    `conn` must have no open transaction (the snapshot opens its own)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets are: {', '.join(TARGETS)}")
    t0 = time.monotonic()
    keys = sorted(set(keys))
    result = RepairResult(table.name, target, len(keys))
    if target == "clickhouse":
        writer: ClickHouseWriter | ElasticsearchWriter = ClickHouseWriter(clickhouse)
    else:
        if table.elasticsearch_index is None:
            raise ValueError(f"{table.name} has no Elasticsearch index")
        writer = ElasticsearchWriter(es)
    failed: list[str] = []
    with consistent_snapshot(conn) as version:
        result.snapshot_lsn = version
        for i in range(0, len(keys), chunk):
            items = _items(conn, table, target, keys[i : i + chunk], version)
            outcome = writer.write(items)
            result.written += outcome.written if target == "elasticsearch" else len(items) - len(outcome.poison)
            result.stale += outcome.stale
            result.tombstones += sum(1 for it in items if it.deleted)
            failed += [f"{[it.row.get(k) for k in table.key]}: {exc}" for it, exc in outcome.poison]
    if target == "elasticsearch":
        es.indices.refresh(index=table.elasticsearch_index)
    if failed:
        raise RepairError(
            f"{len(failed)} key(s) of {table.name} could not be written to {target}: {'; '.join(failed[:5])}"
        )
    # Re-verify exactly these keys, with the reconciler's own comparison.
    reconciler = build_reconciler(table, target, conn=conn, clickhouse=clickhouse, es=es)
    result.still_different = reconciler.differing_keys(keys)
    conn.rollback()
    result.seconds = time.monotonic() - t0
    return result
