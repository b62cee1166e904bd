"""The one reconciliation flow, reconcile -> record -> repair -> verify, that `knowton reconcile`, the
`matches_postgres` asset checks and the `repair` job each call; they only present what it returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from knowton_pipeline.lib.errors import describe_error
from knowton_pipeline.lib.reconcile.engine import STORE_ERRORS, Mode, ReconcileError, ReconcileOptions, ReconcileResult
from knowton_pipeline.lib.reconcile.record import (
    RecordedDifferences,
    load_differences,
    mark_repaired,
    record_result,
    track_incident,
)
from knowton_pipeline.lib.reconcile.repair import RepairError, RepairResult
from knowton_pipeline.lib.reconcile.run import (
    RepairCapError,
    is_aggregate,
    reconcile_pair,
    recorded_keys,
    repair_pair,
    result_keys,
)
from knowton_pipeline.lib.stores import TransientStoreError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Connections:
    """What a flow works with, opened by its caller: PostgreSQL in autocommit mode, the target stores'
    clients by store name (a target the pairs do not need may be left out) and Kafka's bootstrap servers, where
    the sinks' positions are read (None: differences are confirmed after a fixed wait, not at a known position)."""

    conn: psycopg.Connection
    clients: Mapping[str, Any]
    bootstrap: str | None = None


@dataclass(frozen=True)
class ReconcileRequest:
    """How to reconcile, and what to do with the differences found."""

    mode: Mode = "checksum"
    threshold: int = 256
    window_minutes: float = 60.0
    settle_seconds: float = 5.0
    stuck_seconds: float = 60.0
    record: bool = True  # store the result and its keys in ops.reconcile_runs / ops.reconcile_diffs
    repair: bool = False  # re-sync the differing keys right away, then verify them
    max_repair_keys: int = 10_000
    repair_reason: str = "repair requested"  # recorded with every repaired key in ops.reconcile_diffs

    def options(self) -> ReconcileOptions:
        return ReconcileOptions(
            mode=self.mode,
            threshold=self.threshold,
            window=timedelta(minutes=self.window_minutes),
            settle_seconds=self.settle_seconds,
            stuck_seconds=self.stuck_seconds,
        )


@dataclass
class PairOutcome:
    """One (table, target) pair through the flow."""

    table: str
    target: str
    result: ReconcileResult | None = None  # None: a store failed, there is no verdict (`error` says why)
    error: str | None = None
    days: list[date] | None = None  # an aggregate's days compared, when the caller chose them
    reconcile_id: int | None = None  # None: not recorded
    repair: RepairResult | None = None  # re-synced and verified
    repair_refused: str | None = None  # more differing keys than the repair cap: left for a backfill
    healed_after_seconds: float | None = None  # this run closed a drift incident opened that long before

    @property
    def remaining_drift(self) -> bool:
        """Differences left at the end: those found, unless a repair verified every one of them."""
        if self.result is None:
            return False
        if self.repair is not None:
            return not self.repair.verified
        return not self.result.clean


@dataclass
class RepairOutcome:
    """One recorded reconciliation through the repair: `repair` is None when it had nothing left to repair."""

    recorded: RecordedDifferences
    repair: RepairResult | None = None
    repair_refused: str | None = None


def _repair_and_verify(
    connections: Connections,
    name: str,
    target: str,
    keys: Sequence[Any],
    reconcile_id: int | None,
    max_keys: int,
    reason: str,
) -> tuple[RepairResult | None, str | None]:
    """Re-sync `keys`, re-verify them and mark the recorded differences; (result, None) or (None, why refused)."""
    c = connections
    try:
        repaired = repair_pair(name, target, keys, conn=c.conn, clients=c.clients, max_keys=max_keys)
    except RepairCapError as exc:
        return None, str(exc)
    except (RepairError, TransientStoreError, *STORE_ERRORS) as exc:
        # A key the store refuses on its own (it is in the DLQ too), or a store that failed: this pair keeps its
        # drift and says why; the pairs after it still get their verdict.
        return None, f"repair failed: {describe_error(exc)}"
    if reconcile_id is not None:
        mark_repaired(c.conn, reconcile_id, keys, repaired.still_different, reason)
    return repaired, None


def reconcile_pairs(
    connections: Connections,
    pairs: Sequence[tuple[str, str]],
    request: ReconcileRequest,
    *,
    aggregate_days: Callable[[str], Sequence[date]] | None = None,
    dagster_run_id: str | None = None,
    on_progress: Progress | None = None,
) -> Iterator[PairOutcome]:
    """Reconcile each pair, record it, and repair and verify its differences when the request says so.

    Yields one outcome per pair, in order, as soon as it is done. A store failing on one pair is that outcome's
    `error`, and the next pair still runs; the caller decides whether to go on. `aggregate_days(name)` picks the
    days of an aggregate to compare (default: every day)."""
    say = on_progress or (lambda _message: None)
    options = request.options()
    c = connections
    for i, (name, target) in enumerate(pairs, 1):
        say(f"[{i}/{len(pairs)}] reconciling {name} with {target} ({request.mode})")
        started = datetime.now(UTC)
        days = list(aggregate_days(name)) if aggregate_days is not None and is_aggregate(name) else None
        outcome = PairOutcome(name, target, days=days)
        try:
            result = reconcile_pair(
                name,
                target,
                conn=c.conn,
                clients=c.clients,
                options=options,
                days=days,
                on_progress=say,
                bootstrap=c.bootstrap,
            )
        except ReconcileError as exc:
            outcome.error = str(exc)
            yield outcome
            continue
        outcome.result = result
        subject = f"{name} -> {target}"
        if request.record:
            outcome.reconcile_id = record_result(c.conn, result, started_at=started, dagster_run_id=dagster_run_id)
            if not result.clean:  # an incident from the moment drift is found, if none is open yet
                detail = f"{result.differences.total} differing key(s) (reconcile_id {outcome.reconcile_id})"
                track_incident(c.conn, subject, True, detail)
        if request.repair and not result.clean:
            outcome.repair, outcome.repair_refused = _repair_and_verify(
                c,
                name,
                target,
                result_keys(result),
                outcome.reconcile_id,
                request.max_repair_keys,
                request.repair_reason,
            )
        # Only a run that looked at every row may say the drift is gone: an incremental run, or an aggregate's
        # last days, saw part of the table and may open an incident but never closes one.
        covered_all = request.mode != "incremental" and days is None
        if request.record and covered_all and not outcome.remaining_drift:
            outcome.healed_after_seconds = track_incident(c.conn, subject, False, "")
        yield outcome


def repair_recorded(
    connections: Connections,
    *,
    reconcile_id: int | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    max_keys: int = 10_000,
    on_progress: Progress | None = None,
) -> Iterator[RepairOutcome]:
    """Repair and verify the keys a reconciliation recorded and no repair has fixed yet: reconciliation
    `reconcile_id`, or else the latest one of each pair (a pair never reconciled is passed over)."""
    say = on_progress or (lambda _message: None)
    conn = connections.conn
    recorded: list[RecordedDifferences] = []
    if reconcile_id is not None:
        recorded.append(load_differences(conn, reconcile_id=reconcile_id))
    for name, target in pairs if reconcile_id is None else ():
        try:
            recorded.append(load_differences(conn, table=name, target=target))
        except ValueError:
            say(f"{name} -> {target}: no reconciliation recorded yet")
    for rec in recorded:
        keys = rec.all_keys()
        if not keys:
            say(f"{rec.table} -> {rec.target}: nothing to repair (reconcile_id {rec.reconcile_id})")
            yield RepairOutcome(rec)
            continue
        say(f"repairing {len(keys)} key(s) of {rec.table} in {rec.target} (reconcile_id {rec.reconcile_id})")
        repaired, refused = _repair_and_verify(
            connections,
            rec.table,
            rec.target,
            recorded_keys(rec.table, keys),
            rec.reconcile_id,
            max_keys,
            "the repair job",
        )
        yield RepairOutcome(rec, repaired, refused)


__all__ = [
    "Connections",
    "PairOutcome",
    "ReconcileRequest",
    "RepairOutcome",
    "reconcile_pairs",
    "repair_recorded",
]
