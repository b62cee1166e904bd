"""Daily ClickHouse aggregates computed from the mirrors, one UTC day at a time, each day swapped in atomically.

A day is computed into a staging twin of the aggregate table, then `REPLACE PARTITION` moves it into
the real table in one step: readers see the old day or the new one, never a half-written or doubled
day, and recomputing a day any number of times gives the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from knowton_pipeline.lib.clickhouse import run_script
from knowton_pipeline.lib.sql import read_sql

DATABASE = "knowton"
STAGING_DDL = "aggregates_staging.sql"
# The action types user_activity_day.sql writes, so run metadata has every series even on a quiet day.
USER_ACTION_TYPES = ("registration", "content_created", "purchase", "sale")


def _user_activity_totals(client: Client, table: str, params: dict[str, Any]) -> dict[str, int | float]:
    counts: dict[str, int | float] = {t: 0 for t in USER_ACTION_TYPES}
    values: dict[str, int | float] = {f"{t}_value": 0.0 for t in USER_ACTION_TYPES if t != "registration"}
    result = client.query(
        f"SELECT action_type, sum(action_count), sum(total_value) FROM {table} "
        "WHERE date IN {days:Array(Date)} GROUP BY action_type",
        parameters=params,
    )
    for action_type, count, value in result.result_rows:
        counts[action_type] = int(count)
        if action_type != "registration":
            values[f"{action_type}_value"] = float(value)
    users = client.command(
        f"SELECT uniqExact(user_address) FROM {table} WHERE date IN {{days:Array(Date)}}", parameters=params
    )
    return {**counts, **values, "active_users": int(users)}


def _content_sales_totals(client: Client, table: str, params: dict[str, Any]) -> dict[str, int | float]:
    totals: dict[str, int | float] = {"sales": 0}
    result = client.query(
        f"SELECT currency, sum(sales_count), sum(revenue) FROM {table} "
        "WHERE date IN {days:Array(Date)} GROUP BY currency ORDER BY currency",
        parameters=params,
    )
    for currency, sales, revenue in result.result_rows:
        totals["sales"] += int(sales)
        # Amounts in different currencies do not add up: one revenue series per currency.
        totals[f"revenue_{currency}"] = float(revenue)
    contents = client.command(
        f"SELECT uniqExact(content_id) FROM {table} WHERE date IN {{days:Array(Date)}}", parameters=params
    )
    totals["contents_sold"] = int(contents)
    return totals


@dataclass(frozen=True)
class Aggregate:
    name: str  # the table in the `knowton` database, as in sql/clickhouse/aggregates.sql
    day_sql: str  # file under sql/clickhouse/: the SELECT of one day, in the table's column order
    columns: tuple[str, ...]
    # Run metadata: totals of some days as they are in the table, every value a plottable number.
    totals: Callable[[Client, str, dict[str, Any]], dict[str, int | float]]

    @property
    def table(self) -> str:
        return f"{DATABASE}.{self.name}"

    @property
    def staging_table(self) -> str:
        return f"{DATABASE}.{self.name}_staging"


AGGREGATES: dict[str, Aggregate] = {
    a.name: a
    for a in (
        Aggregate(
            name="user_activity",
            day_sql="user_activity_day.sql",
            columns=("date", "user_address", "action_type", "action_count", "total_value"),
            totals=_user_activity_totals,
        ),
        Aggregate(
            name="content_sales_daily",
            day_sql="content_sales_daily_day.sql",
            columns=("date", "content_id", "creator", "currency", "sales_count", "revenue"),
            totals=_content_sales_totals,
        ),
    )
}


def aggregate(name: str) -> Aggregate:
    try:
        return AGGREGATES[name]
    except KeyError:
        raise ValueError(f"unknown aggregate {name!r}; aggregates are: {', '.join(AGGREGATES)}") from None


def day_bounds(day: date) -> dict[str, str]:
    """The query parameters of one UTC day, [start, end), as the DateTime64(6, 'UTC') text the server parses."""
    start = datetime.combine(day, time())
    return {
        "start": start.strftime("%Y-%m-%d %H:%M:%S.%f"),
        "end": (start + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }


def staging_ddl() -> str:
    return read_sql("clickhouse", STAGING_DDL)


def ensure_staging(client: Client) -> None:
    """Create the staging tables if `knowton schema apply` has not yet (idempotent, cheap)."""
    run_script(client, staging_ddl())


def replace_day(client: Client, aggregate_name: str, day: date) -> int:
    """Recompute one UTC day of an aggregate from the mirrors and swap it in atomically; returns its row count.

    Only the day's partition of the staging table is touched (emptied before, dropped after), so
    other days staged by the same process are not disturbed. Two runs recomputing the same day at the
    same moment could still mix their staging rows: the ClickHouse pool keeps such runs from overlapping.
    """
    agg = aggregate(aggregate_name)
    ensure_staging(client)
    part = {"day": day}
    drop_staged = f"ALTER TABLE {agg.staging_table} DROP PARTITION {{day:Date}}"
    client.command(drop_staged, parameters=part)  # leftovers of an interrupted run
    try:
        client.command(
            f"INSERT INTO {agg.staging_table} ({', '.join(agg.columns)}) {read_sql('clickhouse', agg.day_sql)}",
            parameters=day_bounds(day),
        )
        rows = int(
            client.command(f"SELECT count() FROM {agg.staging_table} WHERE date = {{day:Date}}", parameters=part)
        )
        if rows:
            # Atomic: the staged parts replace the day's parts in one step. They are copied (hard links),
            # not moved, hence the drop of the staged partition below.
            client.command(
                f"ALTER TABLE {agg.table} REPLACE PARTITION {{day:Date}} FROM {agg.staging_table}", parameters=part
            )
        else:
            # Recent ClickHouse (26.9 here) refuses REPLACE PARTITION from an empty source (it would drop the
            # destination). An empty day is exactly that drop, and dropping a partition is atomic too.
            client.command(f"ALTER TABLE {agg.table} DROP PARTITION {{day:Date}}", parameters=part)
    finally:
        client.command(drop_staged, parameters=part)
    return rows


def day_totals(client: Client, aggregate_name: str, days: Iterable[date]) -> dict[str, int | float]:
    """Totals of the given days as they are now in the aggregate table, for plottable run metadata."""
    agg = aggregate(aggregate_name)
    return agg.totals(client, agg.table, {"days": sorted(set(days))})
