"""Reconcile a PostgreSQL table with its ClickHouse mirror: checksums computed inside both stores,
bisection of the segments that differ, row-by-row comparison of small ones."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from psycopg import sql

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib import canonical
from knowton_pipeline.lib.reconcile.bisect import BisectStats, Checksum, Differences, Segment, find_differences
from knowton_pipeline.lib.sync.writers import CLICKHOUSE_DATABASE


@dataclass
class ReconcileResult:
    table: str
    target: str
    source_rows: int
    target_rows: int
    differences: Differences
    stats: BisectStats
    seconds: float
    columns: dict[str, int] = field(default_factory=dict)  # differing column -> keys

    @property
    def clean(self) -> bool:
        return self.differences.total == 0

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds else 0.0

    def as_dict(self, sample: int = 20) -> dict[str, Any]:
        d = self.differences
        return {
            "table": self.table,
            "target": self.target,
            "clean": self.clean,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "missing_in_target": len(d.missing_in_target),
            "extra_in_target": len(d.extra_in_target),
            "different": len(d.different),
            "sample_missing": [str(k) for k in d.missing_in_target[:sample]],
            "sample_extra": [str(k) for k in d.extra_in_target[:sample]],
            "sample_different": {str(k): cols for k, cols in list(d.different.items())[:sample]},
            "differing_columns": self.columns,
            "segments_checked": self.stats.segments_checked,
            "rows_compared": self.stats.rows_compared,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }


def _key_sql_pg(table: SyncedTable) -> sql.Composable:
    [key] = table.key
    col = table.column(key)
    return sql.SQL('t.{} COLLATE "C"' if col.type == "text" else "t.{}").format(sql.Identifier(key))


class ClickHouseReconciler:
    def __init__(
        self,
        conn: psycopg.Connection,
        ch: ClickHouseClient,
        table: SyncedTable,
        *,
        database: str = CLICKHOUSE_DATABASE,
        threshold: int = 256,
        fanout: int = 16,
    ):
        if len(table.key) != 1:
            raise ValueError(f"{table.name}: only single-column keys are reconciled so far")
        self.conn, self.ch, self.table, self.database = conn, ch, table, database
        self.threshold, self.fanout = threshold, fanout
        self._counts: dict[Segment, tuple[int, int]] = {}

    # --- the three callbacks of the bisection ---------------------------------------------------
    def checksums(self, seg: Segment) -> tuple[Checksum, Checksum]:
        s = canonical.postgres_segment_checksum(self.conn, self.table, seg.lo, seg.hi)
        t = canonical.clickhouse_segment_checksum(self.ch, self.table, seg.lo, seg.hi, database=self.database)
        self._counts[seg] = (s[0], t[0])
        return Checksum(*s), Checksum(*t)

    def split_points(self, seg: Segment, parts: int, from_target: bool) -> list[Any]:
        count = self._counts.get(seg, (0, 0))[1 if from_target else 0]
        step = max(1, math.ceil(count / parts))
        params = {**canonical.segment_parameters(self.table, seg.lo, seg.hi), "step": step}
        [key] = self.table.key
        if from_target:
            col = canonical.backtick(self.table.column(key).target_name)
            where = canonical.clickhouse_key_range(self.table, seg.lo is not None, seg.hi is not None)
            mirror = f"{canonical.backtick(self.database)}.{canonical.backtick(self.table.clickhouse_table)}"
            query = (
                f"SELECT k FROM (SELECT {col} AS k, row_number() OVER (ORDER BY {col}) AS rn "
                f"FROM {mirror} FINAL WHERE {where}) WHERE rn % {{step:UInt64}} = 1 AND rn > 1 ORDER BY k"
            )
            return [r[0] for r in self.ch.query(query, parameters=params).result_rows]
        query = sql.SQL(
            "SELECT k FROM (SELECT t.{key} AS k, row_number() OVER (ORDER BY {order}) AS rn FROM {rel} AS t "
            "WHERE {range}) s WHERE rn %% %(step)s = 1 AND rn > 1 ORDER BY rn"
        ).format(
            key=sql.Identifier(key),
            order=_key_sql_pg(self.table),
            rel=sql.Identifier(self.table.schema, self.table.name),
            range=canonical.postgres_key_range(self.table, "t", seg.lo is not None, seg.hi is not None),
        )
        return [r[0] for r in self.conn.execute(query, params).fetchall()]

    def compare_rows(self, seg: Segment) -> tuple[Differences, int]:
        params = canonical.segment_parameters(self.table, seg.lo, seg.hi)
        lo, hi = seg.lo is not None, seg.hi is not None
        pg_rows = self.conn.execute(
            canonical.postgres_segment_rows_sql(self.table, lower_bound=lo, upper_bound=hi), params
        )
        source = {r[0]: r[1] for r in pg_rows.fetchall()}
        ch_query = canonical.clickhouse_segment_rows_sql(
            self.table, database=self.database, lower_bound=lo, upper_bound=hi
        )
        target = {r[0]: r[1] for r in self.ch.query(ch_query, parameters=params).result_rows}
        diffs = Differences(
            missing_in_target=[k for k in source if k not in target],
            extra_in_target=[k for k in target if k not in source],
        )
        names = [c.name for c in self.table.columns]
        for k, text in source.items():
            other = target.get(k)
            if other is not None and other != text:
                a, b = text.split("\t"), other.split("\t")
                diffs.different[k] = [n for n, x, y in zip(names, a, b, strict=False) if x != y] or ["(row)"]
        return diffs, len(source) + len(target)

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> ReconcileResult:
        t0 = time.monotonic()
        diffs, stats = find_differences(
            Segment(),
            self.checksums,
            self.split_points,
            self.compare_rows,
            threshold=self.threshold,
            fanout=self.fanout,
        )
        source_rows, target_rows = self._counts.get(Segment(), (0, 0))
        columns: dict[str, int] = {}
        for cols in diffs.different.values():
            for c in cols:
                columns[c] = columns.get(c, 0) + 1
        self.conn.rollback()
        return ReconcileResult(
            self.table.name, "clickhouse", source_rows, target_rows, diffs, stats, time.monotonic() - t0, columns
        )
