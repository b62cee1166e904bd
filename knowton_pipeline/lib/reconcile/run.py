"""What the `reconcile` job and `knowton reconcile` share: which (table, target) pairs to check, one
reconciliation of a pair (a synced table or an aggregate), and the repair of its result."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from typing import Any

import psycopg

from knowton_pipeline.catalog import TABLES, table
from knowton_pipeline.lib.reconcile.aggregates import (
    AGGREGATE_TABLES,
    AggregateReconciler,
    differing_days,
    repair_days,
)
from knowton_pipeline.lib.reconcile.engine import ReconcileOptions, ReconcileResult, build_reconciler
from knowton_pipeline.lib.reconcile.record import key_value
from knowton_pipeline.lib.reconcile.repair import RepairResult, repair_keys
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE


class RepairCapError(ValueError):
    """More differing keys than the cap allows: repairing them is a backfill's job, not a repair's."""


def plan_pairs(tables: Sequence[str] | None = None, targets: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The (table, target) pairs to reconcile; empty selections mean all. Aggregates have the target clickhouse.

    Unknown names are an error; so is naming a table with a target it is not synced to."""
    for t in targets or ():
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; targets are: {', '.join(TARGETS)}")
    for name in tables or ():
        if name not in AGGREGATE_TABLES and name not in {t.name for t in TABLES}:
            known = ", ".join([*(t.name for t in TABLES), *AGGREGATE_TABLES])
            raise ValueError(f"unknown table {name!r}; tables are: {known}")
    chosen_targets = list(targets or TARGETS)
    names = list(tables or [*(t.name for t in TABLES), *AGGREGATE_TABLES])
    pairs: list[tuple[str, str]] = []
    for name in names:
        for target in chosen_targets:
            # The aggregates are ClickHouse tables, computed from its mirrors.
            kept = target == CLICKHOUSE.name if name in AGGREGATE_TABLES else TARGETS[target].holds(table(name))
            if not kept:
                if tables and list(targets or ()) == [target]:  # asked for explicitly: say why not
                    raise ValueError(f"{name} is not synced to {target}")
                continue
            pairs.append((name, target))
    return pairs


def is_aggregate(name: str) -> bool:
    return name in AGGREGATE_TABLES


def table_names() -> list[str]:
    """What a reconciliation can be asked for: the synced tables, then the aggregates."""
    return [*(t.name for t in TABLES), *AGGREGATE_TABLES]


def target_names() -> list[str]:
    """The target stores PostgreSQL is reconciled with."""
    return list(TARGETS)


def reconcile_pair(
    name: str,
    target: str,
    *,
    conn: psycopg.Connection,
    clients: Mapping[str, Any],
    options: ReconcileOptions | None = None,
    days: Sequence[date] | None = None,
    on_progress: Callable[[str], None] | None = None,
    bootstrap: str | None = None,
) -> ReconcileResult:
    """Reconcile table (or aggregate) `name` with the target store `target`; `clients` by store name. `bootstrap`
    (Kafka) lets differences be confirmed at a known position (see `engine.py`); without it, after a fixed wait."""
    if is_aggregate(name):
        return AggregateReconciler(conn, clients.get(CLICKHOUSE.name), name, days=days, on_progress=on_progress).run()
    reconciler = build_reconciler(
        table(name),
        target,
        conn=conn,
        client=clients.get(target),
        options=options,
        on_progress=on_progress,
        bootstrap=bootstrap,
    )
    result = reconciler.run()
    conn.rollback()
    return result


def repair_pair(
    name: str,
    target: str,
    keys: Sequence[Any],
    *,
    conn: psycopg.Connection,
    clients: Mapping[str, Any],
    max_keys: int = 10_000,
) -> RepairResult:
    """Re-sync exactly `keys` of a table into `target` (an aggregate: recompute the days of its keys), then
    re-verify them. More keys than `max_keys` is refused: that is a backfill's job."""
    if len(keys) > max_keys:
        raise RepairCapError(
            f"{name} -> {target}: {len(keys)} differing keys, more than the repair cap of {max_keys}; "
            "raise the cap or backfill the affected days instead"
        )
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    if not is_aggregate(name):
        return repair_keys(conn, table(name), target, keys, client=clients.get(target))
    t0 = time.monotonic()
    days = differing_days(keys)
    clickhouse = clients.get(CLICKHOUSE.name)
    written = repair_days(clickhouse, name, days)
    again = AggregateReconciler(conn, clickhouse, name, days=days).run()
    d = again.differences
    return RepairResult(
        name,
        target,
        requested=len(keys),
        written=written,
        still_different=[*d.missing_in_target, *d.extra_in_target, *d.different],
        seconds=time.monotonic() - t0,
    )


def result_keys(result: ReconcileResult) -> list[Any]:
    d = result.differences
    return [*d.missing_in_target, *d.extra_in_target, *d.different]


def recorded_keys(name: str, keys: Sequence[str]) -> list[Any]:
    """Keys as ops.reconcile_diffs holds them (text) back as the values repair_pair takes."""
    return list(keys) if is_aggregate(name) else [key_value(table(name), k) for k in keys]


__all__ = [
    "RepairCapError",
    "is_aggregate",
    "plan_pairs",
    "reconcile_pair",
    "recorded_keys",
    "repair_pair",
    "result_keys",
    "table_names",
    "target_names",
]
