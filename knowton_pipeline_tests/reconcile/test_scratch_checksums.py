"""Checksums over scratch copies of one table in both stores, filled with the same rows, so that what a run asks is
this run's alone.

- The first pass sums PostgreSQL by parts in the scan that sums it whole (an integer key's range cut evenly, text
  keys grouped by their first characters): a clean run asks each store one question, and drift is located without
  scanning PostgreSQL again (only the mirror is summed by the same parts). Keys the source does not have, below its
  smallest key and above its largest, are still found.
- The mirror's stored hash is read once it holds this code's expression in every part, and equals the hash
  computed from the columns; a mutation behind the pipeline's back changes it; a stale one is not read."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from psycopg import sql

from knowton_pipeline.catalog import TABLES, Column, SyncedTable
from knowton_pipeline.lib.reconcile.bisect import Checksum, Segment
from knowton_pipeline.lib.reconcile.engine import ReconcileOptions, Reconciler, prefix_parts
from knowton_pipeline.lib.stores import target_store
from knowton_pipeline.lib.stores.clickhouse import (
    STORED_HASH_COLUMN,
    ClickHouseSide,
    apply_schema,
    ensure_stored_hash,
    stored_hash_ready,
)
from knowton_pipeline.lib.stores.postgres import PostgresSide

SCHEMA, DATABASE = "scratch_first_pass", "knowton_scratch_first_pass"
ROWS = 2_000


def _table(key_type: str) -> SyncedTable:
    return SyncedTable(
        name="parts",
        schema=SCHEMA,
        key=("id",),
        columns=(Column("id", key_type), Column("amount", "numeric", scale=2), Column("note", "text")),
        clickhouse_table="parts",
        elasticsearch_index=None,
        description="scratch table of the first-pass test",
        created_at=None,
        updated_at=None,
    )


# Per key type: the key of row i (1..ROWS), its PostgreSQL and ClickHouse types, and keys below every key and above.
KEYS: dict[str, tuple[Callable[[int], Any], str, str, Any, Any]] = {
    "bigint": (lambda i: i, "bigint", "Int64", -5, ROWS + 10_000),
    "text": (lambda i: f"é{i:05d}", 'text COLLATE "C"', "String", "a", "ö"),
}


class Asking:
    """Records the checksum questions a side is asked (the side itself answers them, against its real store)."""

    asked: list[tuple[str, list[Segment]]]

    def checksum(self, seg: Segment) -> Checksum:
        self.asked.append(("checksum", [seg]))
        return super().checksum(seg)  # type: ignore[misc]

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        self.asked.append(("checksums_of", list(parts)))
        return super().checksums_of(parts)  # type: ignore[misc]


class AskedPostgres(Asking, PostgresSide):
    def prefix_checksums(self, length: int) -> dict[str, Checksum]:
        sums = super().prefix_checksums(length)
        self.asked.append(("prefix_checksums", prefix_parts(sums)[0]))  # recorded as the parts they make
        return sums


class AskedClickHouse(Asking, ClickHouseSide):
    pass


@pytest.fixture(params=sorted(KEYS))
def key_type(request: pytest.FixtureRequest, pg: psycopg.Connection, ch: ClickHouseClient) -> Iterator[str]:
    """Scratch copies of one table, with the same rows in both stores."""
    key_of, pg_type, ch_type, _, _ = KEYS[request.param]
    rows = [(key_of(i), Decimal(i * 7 % 1000) / 100, f"note {i}") for i in range(1, ROWS + 1)]
    rel = sql.Identifier(SCHEMA, "parts")
    pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    pg.execute(
        sql.SQL("CREATE TABLE {} (id {} PRIMARY KEY, amount numeric(12, 2) NOT NULL, note text NOT NULL)").format(
            rel, sql.SQL(pg_type)
        )
    )
    with pg.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(rel), rows)
    ch.command(f"DROP DATABASE IF EXISTS {DATABASE}")
    ch.command(f"CREATE DATABASE {DATABASE}")
    ch.command(
        f"CREATE TABLE {DATABASE}.parts (id {ch_type}, amount Decimal(12, 2), note String, version UInt64, "
        "is_deleted UInt8) ENGINE = ReplacingMergeTree(version, is_deleted) ORDER BY id"
    )
    ch.insert(f"{DATABASE}.parts", [(*r, 1, 0) for r in rows], column_names=COLUMNS)
    try:
        yield request.param
    finally:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        ch.command(f"DROP DATABASE IF EXISTS {DATABASE}")


COLUMNS = ["id", "amount", "note", "version", "is_deleted"]


def _run(pg: psycopg.Connection, ch: ClickHouseClient, key_type: str) -> tuple[Any, AskedPostgres, AskedClickHouse]:
    table = _table(key_type)
    source, target = AskedPostgres(pg, table, shape="mirror"), AskedClickHouse(ch, table, database=DATABASE)
    source.asked, target.asked = [], []
    options = ReconcileOptions(threshold=16, settle_seconds=0)
    result = Reconciler(table, target_store("clickhouse"), source, target, options).run()
    return result, source, target


def test_the_first_pass_sums_postgresql_by_parts_once_and_drift_rescans_only_the_mirror(
    key_type: str, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    key_of, _, _, below, above = KEYS[key_type]
    ensure_stored_hash(ch, _table(key_type), DATABASE)
    clean, source, target = _run(pg, ch, key_type)
    assert clean.clean and (clean.source_rows, clean.target_rows) == (ROWS, ROWS)
    # One question each: PostgreSQL summed by parts covering every key, the mirror summed whole.
    # (An integer key's range is cut ahead of the scan; text keys are grouped by their first characters.)
    [(question, parts)] = source.asked
    assert question == {"bigint": "checksums_of", "text": "prefix_checksums"}[key_type]
    assert len(parts) > 100 and parts[0].lo is None and parts[-1].hi is None
    assert all(a.hi == b.lo for a, b in itertools.pairwise(parts))
    assert target.asked == [("checksum", [Segment()])]

    # Drift behind the pipeline's back: two rows edited, one deleted, and two keys PostgreSQL does not have, one
    # below its smallest key and one above its largest (they fall in the unbounded first and last parts).
    ch.insert(
        f"{DATABASE}.parts",
        [
            (key_of(17), Decimal("1.00"), "note 17", 2, 0),
            (key_of(1_500), Decimal(1_500 * 7 % 1000) / 100, "edited", 2, 0),
            (key_of(999), Decimal(999 * 7 % 1000) / 100, "note 999", 2, 1),
            (below, Decimal("0.00"), "below", 1, 0),
            (above, Decimal("0.00"), "above", 1, 0),
        ],
        column_names=COLUMNS,
    )
    drifted, source, target = _run(pg, ch, key_type)
    assert drifted.differences.different == {key_of(17): ["amount"], key_of(1_500): ["note"]}
    assert drifted.differences.missing_in_target == [key_of(999)]
    assert sorted(drifted.differences.extra_in_target) == [below, above]
    # PostgreSQL was scanned once, by the first pass's parts; every later question is about a few small segments.
    first, *later = source.asked
    assert first == (question, parts)
    assert all(len(segs) < len(parts) // 10 and Segment() not in segs for _, segs in later)
    # The mirror: summed whole, then by the same parts, then only small segments.
    assert target.asked[:2] == [("checksum", [Segment()]), ("checksums_of", parts)]
    assert all(len(segs) < len(parts) // 10 and Segment() not in segs for _, segs in target.asked[2:])
    # Only the differing parts' rows travelled.
    assert drifted.stats.rows_compared < ROWS // 10


@pytest.mark.parametrize("key_type", ["bigint"], indirect=True)
def test_the_stored_hash_is_read_only_when_it_is_this_codes_and_equals_the_computed_one(
    key_type: str, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    table = _table(key_type)
    parts = Segment().split([500, 1_000, 1_500])

    def sums(side: ClickHouseSide) -> list[Checksum]:
        return [side.checksum(Segment()), *side.checksums_of(parts), *side.day_checksums().values()]

    computed = sums(ClickHouseSide(ch, table, database=DATABASE, full=True))
    # No column yet: the side computes the hash from the columns.
    without = ClickHouseSide(ch, table, database=DATABASE)
    assert not without.stored and sums(without) == computed
    assert ensure_stored_hash(ch, table, DATABASE) == f"clickhouse: {DATABASE}.parts.{STORED_HASH_COLUMN} added"
    assert ensure_stored_hash(ch, table, DATABASE) is None  # applied again: nothing to do
    stored = ClickHouseSide(ch, table, database=DATABASE)
    assert stored.stored and sums(stored) == computed
    assert not ClickHouseSide(ch, table, database=DATABASE, full=True).stored

    # A mutation behind the pipeline's back is seen in the stored hash, so a run finds it.
    ch.command(f"ALTER TABLE {DATABASE}.parts UPDATE note = 'mutated' WHERE id = 42 SETTINGS mutations_sync = 2")
    result, _, target = _run(pg, ch, key_type)
    assert target.stored and result.differences.different == {42: ["note"]}

    # A stored hash of another expression (a release whose spelling changed, or one left half way) is not read:
    # the side computes the hash, and finds the same; applying the schema brings it to this code's.
    ch.command(
        f"ALTER TABLE {DATABASE}.parts MODIFY COLUMN {STORED_HASH_COLUMN} UInt64 MATERIALIZED toUInt64(0) COMMENT ''"
    )
    ch.command(f"ALTER TABLE {DATABASE}.parts MATERIALIZE COLUMN {STORED_HASH_COLUMN} SETTINGS mutations_sync = 2")
    assert not stored_hash_ready(ch, table, DATABASE)
    result, _, target = _run(pg, ch, key_type)
    assert not target.stored and result.differences.different == {42: ["note"]}
    assert ensure_stored_hash(ch, table, DATABASE) == (
        f"clickhouse: {DATABASE}.parts.{STORED_HASH_COLUMN} brought to this release's row hash"
    )
    again = ClickHouseSide(ch, table, database=DATABASE)
    assert again.stored and sums(again) == sums(ClickHouseSide(ch, table, database=DATABASE, full=True))


def test_every_mirror_holds_this_codes_stored_hash_once_the_schema_is_applied(ch: ClickHouseClient) -> None:
    lines = list(apply_schema(ch))  # the stack applied it at start: applied again, it finds them done
    for t in TABLES:
        assert stored_hash_ready(ch, t), t.name
        assert f"clickhouse: knowton.{t.clickhouse_table}.{STORED_HASH_COLUMN} up to date" in lines
        side = ClickHouseSide(ch, t)
        assert side.stored and side.checksum(Segment()) == ClickHouseSide(ch, t, full=True).checksum(Segment())


@pytest.mark.parametrize("key_type", ["text"], indirect=True)
def test_a_sample_of_a_table_whose_size_the_planner_does_not_know_gives_no_estimate(
    key_type: str, pg: psycopg.Connection
) -> None:
    side = PostgresSide(pg, _table(key_type), shape="mirror")
    # Never analyzed: asked for the whole table, the sample stops at its limit, so it is only the first pages.
    keys, rows = side.sample_keys(100)
    assert len(keys) == 400 and rows is None
    keys, rows = side.sample_keys(1_000)  # the limit is above the table: the sample is all of it
    assert sorted(keys) == sorted(KEYS[key_type][0](i) for i in range(1, ROWS + 1)) and rows == ROWS
    pg.execute(sql.SQL("ANALYZE {}.parts").format(sql.Identifier(SCHEMA)))
    keys, rows = side.sample_keys(100)  # a block sample of about 5% (random: it may even be empty)
    assert rows == ROWS and len(keys) <= 400
