"""Reconcile a ClickHouse aggregate with the same aggregate computed by PostgreSQL from the source tables.

Both stores return per-day counts and checksums of the aggregate's canonical rows; only the days that
differ travel, and their rows are compared by key (the day plus the aggregate's grouping columns).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from psycopg import sql

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, Column, SyncedTable
from knowton_pipeline.lib import canonical
from knowton_pipeline.lib.aggregates import AGGREGATES, replace_day
from knowton_pipeline.lib.errors import describe_error
from knowton_pipeline.lib.reconcile.bisect import BisectStats, Checksum, Differences
from knowton_pipeline.lib.reconcile.engine import STORE_ERRORS, ReconcileError, ReconcileResult
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores import clickhouse as ch_store
from knowton_pipeline.lib.stores import postgres as pg_store


def _aggregate_table(name: str, key: tuple[str, ...], columns: tuple[Column, ...]) -> SyncedTable:
    return SyncedTable(
        name=name,
        key=key,
        columns=columns,
        clickhouse_table=name,
        elasticsearch_index=None,
        description=f"the {name} aggregate, compared row by row",
        created_at=None,
        updated_at=None,
    )


# The aggregates' rows as canonical tables: the day spelled as text (YYYY-MM-DD) in both stores.
AGGREGATE_TABLES: dict[str, SyncedTable] = {
    "user_activity": _aggregate_table(
        "user_activity",
        ("date", "user_address", "action_type"),
        (
            Column("date", "text"),
            Column("user_address", "text"),
            Column("action_type", "text"),
            Column("action_count", "bigint"),
            Column("total_value", "numeric", scale=6),
        ),
    ),
    "content_sales_daily": _aggregate_table(
        "content_sales_daily",
        ("date", "content_id", "currency"),
        (
            Column("date", "text"),
            Column("content_id", "bigint"),
            Column("creator", "text"),
            Column("currency", "text"),
            Column("sales_count", "bigint"),
            Column("revenue", "numeric", scale=6),
        ),
    ),
}
assert set(AGGREGATE_TABLES) == set(AGGREGATES), "every ClickHouse aggregate needs its PostgreSQL reference"

_CH_CAST = {"text": "toString({})", "bigint": "toInt64({})", "numeric": "{}"}


def aggregate_table(name: str) -> SyncedTable:
    try:
        return AGGREGATE_TABLES[name]
    except KeyError:
        raise ValueError(f"unknown aggregate {name!r}; aggregates are: {', '.join(AGGREGATE_TABLES)}") from None


def _bounds(days: Sequence[date] | None) -> dict[str, Any]:
    if not days:
        return {"start": "-infinity", "end": "infinity"}
    start = min(days)
    end = max(days) + timedelta(days=1)
    return {"start": f"{start.isoformat()} 00:00:00+00", "end": f"{end.isoformat()} 00:00:00+00"}


class AggregateReconciler:
    """One aggregate, all its days or the given ones."""

    def __init__(
        self,
        conn: psycopg.Connection,
        ch: ClickHouseClient,
        name: str,
        *,
        days: Sequence[date] | None = None,
        database: str = CLICKHOUSE_DATABASE,
        on_progress: Callable[[str], None] | None = None,
    ):
        self.conn, self.ch, self.table = conn, ch, aggregate_table(name)
        self.name, self.database = name, database
        self.days = sorted(set(days)) if days is not None else None
        self._on_progress = on_progress or (lambda _m: None)
        self._pg_relation = sql.SQL("({})").format(sql.SQL(read_sql("postgres", f"{name}_days.sql").strip()))  # type: ignore[arg-type]
        casts = ", ".join(
            "toString(`date`) AS `date`"
            if c.name == "date"
            else f"{_CH_CAST[c.type].format(ch_store.backtick(c.name))} AS {ch_store.backtick(c.name)}"
            for c in self.table.columns
        )
        # Through the table alias: a SELECT alias shadows the column of the same name in ClickHouse's WHERE.
        where = "a.`date` >= {first:Date} AND a.`date` <= {last:Date}" if self.days else "1"
        self._ch_relation = (
            f"(SELECT {casts} FROM {ch_store.backtick(database)}.{ch_store.backtick(name)} AS a WHERE {where})"
        )

    def _ch_params(self) -> dict[str, Any]:
        return {"first": self.days[0], "last": self.days[-1]} if self.days else {}

    def _day_checksums(self) -> tuple[dict[str, Checksum], dict[str, Checksum]]:
        pg_query = sql.SQL("SELECT t.date, count(*), coalesce(sum({h}), 0) FROM {rel} AS t GROUP BY t.date").format(
            h=pg_store.hash_sql(self.table, "t"), rel=self._pg_relation
        )
        source = {
            r[0]: Checksum(int(r[1]), int(r[2])) for r in self.conn.execute(pg_query, _bounds(self.days)).fetchall()
        }
        ch_query = (
            f"SELECT `date`, count(), sum(toUInt128({ch_store.hash_sql(self.table)})) "
            f"FROM {self._ch_relation} GROUP BY `date`"
        )
        target = {
            r[0]: Checksum(int(r[1]), int(r[2]))
            for r in self.ch.query(ch_query, parameters=self._ch_params()).result_rows
        }
        if self.days is not None:
            wanted = {d.isoformat() for d in self.days}
            source = {d: c for d, c in source.items() if d in wanted}
            target = {d: c for d, c in target.items() if d in wanted}
        return source, target

    def _rows(self, days: list[str]) -> tuple[dict[tuple[Any, ...], str], dict[tuple[Any, ...], str]]:
        keys = self.table.key
        pg_query = sql.SQL("SELECT {keys}, {canon} FROM {rel} AS t WHERE t.date = ANY(%(days)s)").format(
            keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in keys),
            canon=pg_store.canonical_sql(self.table, "t"),
            rel=self._pg_relation,
        )
        rows = self.conn.execute(pg_query, {**_bounds(self.days), "days": days}).fetchall()
        source = {tuple(r[: len(keys)]): r[len(keys)] for r in rows}
        ch_query = (
            f"SELECT {', '.join(ch_store.backtick(k) for k in keys)}, {ch_store.canonical_sql(self.table)} "
            f"FROM {self._ch_relation} WHERE `date` IN {{days:Array(String)}}"
        )
        result = self.ch.query(ch_query, parameters={**self._ch_params(), "days": days})
        target = {tuple(r[: len(keys)]): r[len(keys)] for r in result.result_rows}
        return source, target

    def compare_days(self, days: list[str]) -> tuple[Differences, int]:
        source, target = self._rows(days)
        names = [c.name for c in self.table.columns]
        diffs = Differences(
            missing_in_target=sorted(k for k in source if k not in target),
            extra_in_target=sorted(k for k in target if k not in source),
        )
        for key in sorted(source.keys() & target.keys()):
            a, b = source[key], target[key]
            if a != b:
                pairs = zip(names, a.split(canonical.SEPARATOR), b.split(canonical.SEPARATOR), strict=False)
                diffs.different[key] = [n for n, x, y in pairs if x != y] or ["(row)"]
        return diffs, len(source) + len(target)

    def run(self) -> ReconcileResult:
        t0 = time.monotonic()
        try:
            source, target = self._day_checksums()
            zero = Checksum(0, 0)
            bad = sorted(d for d in source.keys() | target.keys() if source.get(d, zero) != target.get(d, zero))
            self._on_progress(f"{self.name}: {len(source | target)} day(s) compared, {len(bad)} differ")
            diffs, rows = self.compare_days(bad) if bad else (Differences(), 0)
        except STORE_ERRORS as exc:
            raise ReconcileError(
                f"reconciling aggregate {self.name} stopped, no verdict: {describe_error(exc)}"
            ) from exc
        finally:
            self.conn.rollback()
        day_counts = {
            date.fromisoformat(d): (source.get(d, Checksum(0, 0)).count, target.get(d, Checksum(0, 0)).count)
            for d in bad
            if source.get(d, Checksum(0, 0)).count != target.get(d, Checksum(0, 0)).count
        }
        return ReconcileResult(
            table=self.name,
            target="clickhouse",
            mode="full" if self.days is None else "days",
            source_rows=sum(c.count for c in source.values()),
            target_rows=sum(c.count for c in target.values()),
            differences=diffs,
            stats=BisectStats(segments_checked=len(source | target), segments_compared=len(bad), rows_compared=rows),
            seconds=time.monotonic() - t0,
            day_counts=day_counts,  # type: ignore[arg-type]
            first_pass=diffs.total,
        )


def differing_days(keys: Sequence[Any]) -> list[date]:
    """The days of aggregate keys: tuples whose first value is the day, or their recorded text ("day|...")."""
    return sorted({date.fromisoformat(k[0] if isinstance(k, tuple) else str(k).split("|")[0]) for k in keys})


def repair_days(ch: ClickHouseClient, name: str, days: Sequence[date]) -> int:
    """Recompute the given days of an aggregate from the mirrors (atomically per day); returns rows written."""
    return sum(replace_day(ch, name, day) for day in sorted(set(days)))
