"""Backfill runs of the mirror and index assets: day by day, resumable when a failed run is re-executed."""

from collections.abc import Callable
from datetime import datetime, timedelta

import dagster as dg

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.defs.resources import PostgresResource
from knowton_pipeline.lib.stores import Writer
from knowton_pipeline.lib.sync.apply import SinkTurns
from knowton_pipeline.lib.sync.backfill import BackfillStats, backfill_range


def days_in(window: dg.TimeWindow) -> list[datetime]:
    days, day = [], window.start
    while day < window.end:
        days.append(day)
        day += timedelta(days=1)
    return days


def run_backfill(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    table: SyncedTable,
    writer: Writer,
    after_each_day: Callable[[], object] | None = None,
    between_chunks: SinkTurns | None = None,
) -> dg.MaterializeResult:
    """Backfill every day of the run's partition range, each in its own consistent snapshot. `between_chunks`
    gives the store's sink its turns while the backfill holds the store.

    Days finished by an earlier attempt of the same run (a re-execution shares its root run id)
    are skipped, so a long backfill that failed part-way resumes where it stopped.
    """
    asset = context.asset_key.to_user_string()
    root = context.run.root_run_id or context.run.run_id
    days = days_in(context.partition_time_window)
    totals = BackfillStats()
    with postgres.get_connection() as conn:
        done = {
            r[0]
            for r in conn.execute(
                "SELECT day FROM ops.backfill_progress WHERE root_run_id = %s AND asset = %s", (root, asset)
            ).fetchall()
        }
        conn.commit()
        todo = [d for d in days if d.date() not in done]
        if len(todo) < len(days):
            context.log.info(f"resuming run {root}: {len(days) - len(todo)} of {len(days)} days already done")
        for i, day in enumerate(todo, 1):
            stats = backfill_range(conn, table, day, day + timedelta(days=1), writer, on_progress=between_chunks)
            conn.execute(
                "INSERT INTO ops.backfill_progress (root_run_id, asset, day, rows_written, snapshot_lsn) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (root, asset, day.date(), stats.written, stats.snapshot_lsn),
            )
            conn.commit()
            totals.rows += stats.rows
            totals.written += stats.written
            totals.stale += stats.stale
            totals.seconds += stats.seconds
            totals.snapshot_lsn = max(totals.snapshot_lsn, stats.snapshot_lsn)
            context.log.info(
                f"{day.date()}: {stats.rows} rows ({stats.rows_per_second:,.0f} rows/s); "
                f"day {i} of {len(todo)}, {totals.rows} rows so far"
            )
            if after_each_day:
                after_each_day()
            if between_chunks:
                between_chunks()
    return dg.MaterializeResult(
        metadata={
            "days": len(days),
            "days_resumed": len(days) - len(todo),
            "rows": totals.rows,
            "written": totals.written,
            "stale_refused": totals.stale,
            "snapshot_lsn": totals.snapshot_lsn,
            "seconds": round(totals.seconds, 3),
            "rows_per_second": round(totals.rows_per_second, 1),
            **(
                {"sink_turns": between_chunks.turns, "cdc_events_applied_meanwhile": between_chunks.events}
                if between_chunks
                else {}
            ),
        }
    )
