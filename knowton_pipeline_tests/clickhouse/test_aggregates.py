"""Daily aggregates on the real embedded engine: exact rows from the mirrors read with FINAL, and days
replaced atomically and idempotently.

Mirror rows are written straight into the mirrors with chosen versions, under keys unique to each
test run (uuid addresses and ids), and assertions look at those keys only, so data of other tests or
earlier runs on the same day never interferes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.clickhouse.aggregates import aggregate_asset, aggregate_key
from knowton_pipeline.defs.clickhouse.mirrors import mirror_key
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.aggregates import AGGREGATES, aggregate, replace_day
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.stack.manager import Stack

DAY = date(2001, 2, 3)  # before any real data: only these tests write here
ASSET_DAY = date(2025, 2, 3)  # the asset's partitions start in 2025
LAST_MICROSECOND = timedelta(days=1) - timedelta(microseconds=1)

USER_COLUMNS = ["address", "username", "reputation", "is_verified", "created_at", "updated_at", "version", "is_deleted"]
CONTENT_COLUMNS = [
    "id",
    "creator",
    "title",
    "category",
    "tags",
    "price",
    "status",
    "metadata",
    "created_at",
    "updated_at",
    "version",
    "is_deleted",
]
PURCHASE_COLUMNS = [
    "id",
    "content_id",
    "buyer",
    "amount",
    "currency",
    "status",
    "created_at",
    "updated_at",
    "version",
    "is_deleted",
]


@pytest.fixture
def ch(stack: Stack, settings: Settings) -> ClickHouseClient:
    return clickhouse.get_client(settings.clickhouse_dsn)


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def new_address() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def new_id() -> int:
    # Far above PostgreSQL's identity values, unique per run.
    return 10**15 + uuid.uuid4().int % 10**15


@dataclass
class Mirrors:
    """Writes mirror rows directly, with explicit versions, and remembers the keys it wrote."""

    ch: ClickHouseClient
    addresses: set[str] = field(default_factory=set)
    content_ids: set[int] = field(default_factory=set)

    def user(self, address: str, created_at: datetime, *, version: int = 1, deleted: bool = False) -> str:
        self.addresses.add(address)
        row = [address, f"u-{address[2:14]}", 0, False, created_at, created_at, version, int(deleted)]
        self.ch.insert("knowton.users", [row], column_names=USER_COLUMNS)
        return address

    def content(
        self,
        content_id: int,
        creator: str,
        price: str,
        created_at: datetime,
        *,
        version: int = 1,
        deleted: bool = False,
    ) -> int:
        self.content_ids.add(content_id)
        row = [
            content_id,
            creator,
            "A title",
            "art",
            [],
            Decimal(price),
            "published",
            "{}",
            created_at,
            created_at,
            version,
            int(deleted),
        ]
        self.ch.insert("knowton.contents", [row], column_names=CONTENT_COLUMNS)
        return content_id

    def purchase(
        self,
        purchase_id: int,
        content_id: int,
        buyer: str,
        amount: str,
        created_at: datetime,
        *,
        currency: str = "ETH",
        status: str = "completed",
        version: int = 1,
        deleted: bool = False,
    ) -> int:
        row = [
            purchase_id,
            content_id,
            buyer,
            Decimal(amount),
            currency,
            status,
            created_at,
            created_at,
            version,
            int(deleted),
        ]
        self.ch.insert("knowton.purchases", [row], column_names=PURCHASE_COLUMNS)
        return purchase_id

    def user_activity(self, day: date) -> set[tuple[Any, ...]]:
        result = self.ch.query(
            "SELECT user_address, action_type, action_count, total_value FROM knowton.user_activity "
            "WHERE date = {day:Date} AND has({keys:Array(String)}, user_address)",
            parameters={"day": day, "keys": sorted(self.addresses)},
        )
        return set(result.result_rows)

    def content_sales(self, day: date) -> set[tuple[Any, ...]]:
        result = self.ch.query(
            "SELECT content_id, creator, currency, sales_count, revenue FROM knowton.content_sales_daily "
            "WHERE date = {day:Date} AND has({keys:Array(Int64)}, content_id)",
            parameters={"day": day, "keys": sorted(self.content_ids)},
        )
        return set(result.result_rows)


@dataclass
class World:
    """A day of KnowTon activity with the traps: stale versions, deletes, rows on both day boundaries."""

    mirrors: Mirrors
    day: date
    alice: str  # creator, registered that day
    bob: str  # buyer, registered ten days before
    carol: str  # registered in the day's last microsecond
    dave: str  # registered that day, then deleted
    erin: str  # registered at midnight after the day
    c1: int
    c2: int
    p1: int
    p5: int


def build_world(ch: ClickHouseClient, day: date) -> World:
    m = Mirrors(ch)
    start = midnight(day)
    end = start + timedelta(days=1)
    alice = m.user(new_address(), start + timedelta(hours=10))
    bob = m.user(new_address(), start - timedelta(days=10))
    carol = m.user(new_address(), start + LAST_MICROSECOND)
    dave = m.user(new_address(), start + timedelta(hours=3))
    m.user(dave, start + timedelta(hours=3), version=2, deleted=True)
    erin = m.user(new_address(), end)

    c1, c2, c3 = new_id(), new_id(), new_id()
    m.content(c1, alice, "7.50", start + timedelta(hours=11), version=3)
    m.content(c1, alice, "1.00", start + timedelta(hours=11), version=1)  # stale, written after the newest
    m.content(c2, alice, "3.00", start)  # the day's first microsecond
    m.content(c3, alice, "9.99", start + timedelta(hours=12))
    m.content(c3, alice, "9.99", start + timedelta(hours=12), version=2, deleted=True)

    p1, p2, p3, p4, p5, p6 = (new_id() for _ in range(6))
    m.purchase(p1, c1, bob, "7.500000", start + timedelta(hours=12), version=2)
    m.purchase(p1, c1, bob, "7.500000", start + timedelta(hours=12), status="pending", version=1)  # stale
    m.purchase(p2, c1, bob, "7.500000", start + timedelta(hours=13), status="refunded", version=2)
    m.purchase(p2, c1, bob, "7.500000", start + timedelta(hours=13), version=1)  # stale "completed"
    m.purchase(p3, c2, bob, "3.000000", start + timedelta(hours=14))
    m.purchase(p3, c2, bob, "3.000000", start + timedelta(hours=14), version=2, deleted=True)
    m.purchase(p4, c2, bob, "2.250000", start + LAST_MICROSECOND)
    m.purchase(p5, c2, bob, "4.000000", end)  # the next day's first microsecond
    m.purchase(p6, c1, bob, "100.000000", start + timedelta(hours=15), currency="USDC")
    return World(m, day, alice, bob, carol, dave, erin, c1, c2, p1, p5)


def expected_user_activity(w: World) -> set[tuple[Any, ...]]:
    return {
        (w.alice, "registration", 1, Decimal("0")),
        (w.carol, "registration", 1, Decimal("0")),
        (w.alice, "content_created", 2, Decimal("10.50")),
        (w.bob, "purchase", 3, Decimal("109.75")),
        (w.alice, "sale", 3, Decimal("109.75")),
    }


def expected_content_sales(w: World) -> set[tuple[Any, ...]]:
    return {
        (w.c1, w.alice, "ETH", 1, Decimal("7.5")),
        (w.c1, w.alice, "USDC", 1, Decimal("100")),
        (w.c2, w.alice, "ETH", 1, Decimal("2.25")),
    }


def replace_both(ch: ClickHouseClient, day: date) -> None:
    for name in AGGREGATES:
        replace_day(ch, name, day)


def test_a_day_counts_newest_versions_only_and_respects_both_day_boundaries(ch: ClickHouseClient) -> None:
    w = build_world(ch, DAY)
    assert replace_day(ch, "user_activity", DAY) >= len(expected_user_activity(w))
    assert replace_day(ch, "content_sales_daily", DAY) >= len(expected_content_sales(w))
    assert w.mirrors.user_activity(DAY) == expected_user_activity(w)
    assert w.mirrors.content_sales(DAY) == expected_content_sales(w)


def test_the_next_day_gets_the_rows_at_its_first_microsecond(ch: ClickHouseClient) -> None:
    w = build_world(ch, DAY)
    next_day = DAY + timedelta(days=1)
    replace_both(ch, next_day)
    assert w.mirrors.user_activity(next_day) == {
        (w.erin, "registration", 1, Decimal("0")),
        (w.bob, "purchase", 1, Decimal("4")),
        (w.alice, "sale", 1, Decimal("4")),
    }
    assert w.mirrors.content_sales(next_day) == {(w.c2, w.alice, "ETH", 1, Decimal("4"))}


def test_replacing_a_day_twice_gives_the_same_rows_not_doubles(ch: ClickHouseClient) -> None:
    w = build_world(ch, DAY)
    replace_both(ch, DAY)
    first = (w.mirrors.user_activity(DAY), w.mirrors.content_sales(DAY))
    counts = {name: replace_day(ch, name, DAY) for name in AGGREGATES}
    assert (w.mirrors.user_activity(DAY), w.mirrors.content_sales(DAY)) == first
    # The table holds the day exactly once: as many rows as the last recomputation wrote.
    for name, rows in counts.items():
        in_table = ch.command(f"SELECT count() FROM knowton.{name} WHERE date = {{d:Date}}", parameters={"d": DAY})
        assert int(in_table) == rows


def test_a_changed_mirror_row_is_reflected_when_the_day_is_replaced_again(ch: ClickHouseClient) -> None:
    w = build_world(ch, DAY)
    replace_both(ch, DAY)
    start = midnight(DAY)
    w.mirrors.content(w.c1, w.alice, "8.00", start + timedelta(hours=11), version=4)
    w.mirrors.purchase(w.p1, w.c1, w.bob, "7.500000", start + timedelta(hours=12), status="refunded", version=5)
    replace_both(ch, DAY)
    assert w.mirrors.user_activity(DAY) == {
        (w.alice, "registration", 1, Decimal("0")),
        (w.carol, "registration", 1, Decimal("0")),
        (w.alice, "content_created", 2, Decimal("11")),
        (w.bob, "purchase", 2, Decimal("102.25")),
        (w.alice, "sale", 2, Decimal("102.25")),
    }
    assert w.mirrors.content_sales(DAY) == {
        (w.c1, w.alice, "USDC", 1, Decimal("100")),
        (w.c2, w.alice, "ETH", 1, Decimal("2.25")),
    }


def test_replacing_one_day_leaves_the_other_days_partitions_untouched(ch: ClickHouseClient) -> None:
    w = build_world(ch, DAY)
    next_day = DAY + timedelta(days=1)
    replace_both(ch, DAY)
    replace_both(ch, next_day)
    before = (w.mirrors.user_activity(next_day), w.mirrors.content_sales(next_day))
    assert before[1]
    # The next day's mirror rows change, but only DAY is recomputed: the next day keeps what it had.
    w.mirrors.purchase(w.p5, w.c2, w.bob, "4.000000", midnight(next_day), status="refunded", version=9)
    replace_both(ch, DAY)
    assert (w.mirrors.user_activity(next_day), w.mirrors.content_sales(next_day)) == before
    assert w.mirrors.user_activity(DAY) == expected_user_activity(w)


def test_a_day_with_nothing_left_writes_zero_rows_and_keeps_no_stale_rows(ch: ClickHouseClient) -> None:
    # A day of its own (random per run, in the 1970s to 1990s: a Date starts in 1970), whose every
    # row this test deletes again.
    day = date(1971, 1, 1) + timedelta(days=uuid.uuid4().int % 10_000)
    m = Mirrors(ch)
    start = midnight(day)
    buyer = m.user(new_address(), start + timedelta(hours=1))
    content = m.content(new_id(), buyer, "2.00", start + timedelta(hours=2))
    purchase = m.purchase(new_id(), content, buyer, "2.000000", start + timedelta(hours=3))
    replace_both(ch, day)
    assert m.user_activity(day) and m.content_sales(day)

    m.user(buyer, start + timedelta(hours=1), version=2, deleted=True)
    m.content(content, buyer, "2.00", start + timedelta(hours=2), version=2, deleted=True)
    m.purchase(purchase, content, buyer, "2.000000", start + timedelta(hours=3), version=2, deleted=True)
    for name in AGGREGATES:
        assert replace_day(ch, name, day) == 0
        left = ch.command(f"SELECT count() FROM knowton.{name} WHERE date = {{d:Date}}", parameters={"d": day})
        assert int(left) == 0


def test_a_replaced_day_leaves_nothing_staged_and_other_staged_days_alone(ch: ClickHouseClient) -> None:
    build_world(ch, DAY)
    staging = aggregate("content_sales_daily").staging_table
    replace_day(ch, "content_sales_daily", DAY)  # creates the staging table if schema apply has not
    other = date(1970, 1, 2)
    marker = new_id()
    ch.command(f"INSERT INTO {staging} VALUES ('1970-01-02', {marker}, '0xother', 'ETH', 1, 1)")
    try:
        replace_day(ch, "content_sales_daily", DAY)
        staged = ch.query(f"SELECT date, content_id FROM {staging}").result_rows
        assert (other, marker) in staged
        assert all(d != DAY for d, _ in staged)
    finally:
        ch.command(f"ALTER TABLE {staging} DROP PARTITION {{d:Date}}", parameters={"d": other})


def test_unknown_aggregate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregate 'user_actvity'; aggregates are: user_activity"):
        replace_day(None, "user_actvity", DAY)  # type: ignore[arg-type]


def test_aggregates_sit_downstream_of_the_mirrors_they_read() -> None:
    users, contents, purchases = (mirror_key(table(n)) for n in ("User", "Content", "Purchase"))
    user_activity = aggregate_asset(aggregate("user_activity"))
    content_sales = aggregate_asset(aggregate("content_sales_daily"))
    assert user_activity.asset_deps[aggregate_key(aggregate("user_activity"))] == {users, contents, purchases}
    assert content_sales.asset_deps[aggregate_key(aggregate("content_sales_daily"))] == {contents, purchases}


def test_materializing_a_partition_replaces_the_day_and_reports_plottable_metadata(ch: ClickHouseClient) -> None:
    w = build_world(ch, ASSET_DAY)
    assets = [aggregate_asset(a) for a in AGGREGATES.values()]
    for _ in range(2):  # a re-run of the day is safe
        result = dg.materialize(assets, partition_key=ASSET_DAY.isoformat(), resources=build_resources())
        assert result.success
    assert w.mirrors.user_activity(ASSET_DAY) == expected_user_activity(w)
    assert w.mirrors.content_sales(ASSET_DAY) == expected_content_sales(w)

    metadata = {
        e.asset_key.path[-1]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    activity, sales = metadata["user_activity"], metadata["content_sales_daily"]
    # The day may hold other tests' rows too: the metadata describes the whole day as the table has it.
    in_table = ch.query(
        "SELECT action_type, sum(action_count), count() FROM knowton.user_activity WHERE date = {d:Date} "
        "GROUP BY action_type",
        parameters={"d": ASSET_DAY},
    ).result_rows
    assert activity["rows"] == sum(r[2] for r in in_table)
    assert {t: activity[t] for t, _, _ in in_table} == {t: n for t, n, _ in in_table}
    assert activity["registration"] >= 2 and activity["sale"] >= 3 and activity["sale_value"] >= 109.75
    assert activity["days"] == 1 and activity["seconds"] >= 0
    assert sales["sales"] >= 3 and sales["revenue_USDC"] >= 100 and sales["contents_sold"] >= 2
    for values in metadata.values():
        assert all(isinstance(v, int | float) for v in values.values()), values


def test_a_partition_range_run_replaces_each_day_of_the_range(ch: ClickHouseClient) -> None:
    w = build_world(ch, ASSET_DAY)
    next_day = ASSET_DAY + timedelta(days=1)
    result = dg.materialize(
        [aggregate_asset(aggregate("content_sales_daily"))],
        resources=build_resources(),
        tags={
            "dagster/asset_partition_range_start": ASSET_DAY.isoformat(),
            "dagster/asset_partition_range_end": next_day.isoformat(),
        },
    )
    assert result.success
    events = result.get_asset_materialization_events()
    # One materialization per day of the range, each carrying the run's totals.
    assert {e.materialization.partition for e in events} == {ASSET_DAY.isoformat(), next_day.isoformat()}
    assert all(e.materialization.metadata["days"].value == 2 for e in events)
    assert w.mirrors.content_sales(ASSET_DAY) == expected_content_sales(w)
    assert w.mirrors.content_sales(next_day) == {(w.c2, w.alice, "ETH", 1, Decimal("4"))}
