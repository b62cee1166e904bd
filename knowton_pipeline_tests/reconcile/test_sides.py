"""Each store's split checksums (all parts of a split in one query) equal the parts' own checksums, for
text and integer keys, with points taken from the keys present and points between them; so do the checksums and
rows of many scattered segments asked at once; the full search side read in parallel slices answers exactly as
one stream does."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.canonical import row_hash
from knowton_pipeline.lib.reconcile.bisect import Checksum, Segment
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import Side
from knowton_pipeline.lib.stores.clickhouse import ClickHouseSide
from knowton_pipeline.lib.stores.elasticsearch import DocumentStreamSide, StoredHashSide
from knowton_pipeline.lib.stores.postgres import PostgresSide
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import insert_content, insert_user


@pytest.mark.parametrize("name", ["User", "Content"])
def test_split_and_batched_checksums_and_rows_match_those_of_each_part(
    name: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg)
    pg.execute('UPDATE "User" SET username = %s WHERE address = %s', (f"Ünïcode ✓ {creator[2:10]}", creator))
    for i in range(12):
        insert_content(pg, creator, title=f"t{i}")
    apply()
    t = table(name)
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        sides: list[Side] = [
            PostgresSide(conn, t, shape="mirror"),
            ClickHouseSide(ch, t),
            PostgresSide(conn, t, shape="document"),
            StoredHashSide(es, t),
            DocumentStreamSide(es, t),
        ]
        for side in sides:
            whole = side.checksum(Segment())
            keys = side.split_points(Segment(), 5, whole.count)
            assert len(keys) >= 3, side.label
            # Points at keys present, and one between two keys (not present in any store).
            between = keys[1] + 1 if isinstance(keys[1], int) else keys[1] + " "
            for points in (keys, sorted({*keys, between})):
                parts = Segment().split(points)
                ahead = side.split_checksums(Segment(), [p.lo for p in parts[1:]])
                assert ahead == [side.checksum(p) for p in parts], side.label
                assert sum(c.count for c in ahead) == whole.count
                inner = Segment(keys[0], keys[-1])
                inner_parts = inner.split(points)
                assert side.split_checksums(inner, [p.lo for p in inner_parts[1:]]) == [
                    side.checksum(p) for p in inner_parts
                ], side.label
                # Many segments at once, in runs with gaps between them (as a bisection level asks): the first
                # part unbounded below, then every other part.
                scattered = parts[::2]
                assert side.checksums_of(scattered) == [side.checksum(p) for p in scattered], side.label
                assert side.checksums_of(parts) == ahead, side.label
                one_by_one: dict = {}
                for part in scattered:
                    one_by_one.update(side.rows(part))
                assert side.rows_of(scattered) == one_by_one and one_by_one, side.label
                assert side.rows_of(parts[1::2]) == {
                    k: v for part in parts[1::2] for k, v in side.rows(part).items()
                }, side.label


@pytest.mark.parametrize("name", ["User", "Content"])
def test_the_full_search_side_hashed_in_parallel_slices_answers_as_one_stream_does(
    name: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg)
    for i in range(5):
        insert_content(pg, creator, title=f"sliced {i}")
    apply()
    t = table(name)
    one = DocumentStreamSide(es, t, workers=1)
    sliced = DocumentStreamSide(es, t, workers=3)
    sliced.parallel_from = 0  # slices and worker processes even for the tests' few documents
    reported: list[int] = []
    sliced._progress = reported.append
    whole = one.checksum(Segment())
    assert whole.count > 3
    assert sliced.checksum(Segment()) == whole
    assert sliced.day_checksums() == one.day_checksums()
    assert sliced.key_bounds(Segment()) == one.key_bounds(Segment())
    points = one.split_points(Segment(), 7, whole.count)
    assert sliced.split_points(Segment(), 7, whole.count) == points
    assert sliced.split_checksums(Segment(), points) == one.split_checksums(Segment(), points)
    assert sliced._hashed == whole.count, "every document was hashed once, by one of the workers"


def expected_checksums(rows: dict[Any, str], parts: list[Segment]) -> list[Checksum]:
    """Per-part checksums computed in Python from a side's canonical rows (str order is UTF-8 byte order)."""
    sums = [Checksum(0, 0)] * len(parts)
    starts = [p.lo for p in parts[1:]]
    for key, canonical in rows.items():
        i = bisect.bisect_right(starts, key)
        sums[i] = Checksum(sums[i].count + 1, sums[i].total + row_hash(canonical))
    return sums


def test_many_text_parts_are_found_by_binary_search_exactly_as_one_by_one(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    for _ in range(20):
        insert_user(pg)
    apply()
    t = table("User")
    # Over 256 parts of User's text keys: short starts (at most 8 bytes, one with a two-byte character) that the
    # stores search by their first 8 bytes, and long starts sharing them, which the stores compare one by one.
    short = sorted({*(f"0x{i:03x}" for i in range(0, 4096, 13)), "0x8é", "0x"})
    long_ = sorted({f"0x{i:02x}{'0' * 8}{j}" for i in range(0, 256, 2) for j in (1, 5, 9)})
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        sides: list[Side] = [
            PostgresSide(conn, t, shape="mirror"),
            ClickHouseSide(ch, t),
            PostgresSide(conn, t, shape="document"),
            StoredHashSide(es, t),
        ]
        for side in sides:
            rows = side.rows(Segment())
            assert len(rows) >= 20, side.label
            for starts in (short, long_):
                parts = Segment().split(starts)
                assert len(parts) > 256
                found = side.checksums_of(parts)
                assert found == expected_checksums(rows, parts), side.label
                assert sum(c.count for c in found) == len(rows)
                inner = parts[1:]  # every part bounded below, as a deeper level asks
                assert side.checksums_of(inner[::3]) == expected_checksums(rows, parts)[1:][::3], side.label


def test_many_integer_parts_are_summed_by_range_and_by_search_exactly_as_one_by_one(
    caught_up: None, apply: Callable[[], ApplyStats], pg: psycopg.Connection, es: Elasticsearch
) -> None:
    creator = insert_user(pg)
    for i in range(20):
        insert_content(pg, creator, title=f"ranged {i}")
    apply()
    side = StoredHashSide(es, table("Content"))
    rows = side.rows(Segment())
    lo, hi = min(rows), max(rows)
    # More parts than one range aggregation takes (RANGES_PER_QUERY), some of them empty.
    points = sorted({*range(lo, lo + 700), lo + (hi - lo) // 2, hi})
    parts = Segment().split(points)
    assert len(parts) > 600
    expected = expected_checksums(rows, parts)
    assert sum(c.count for c in expected) == len(rows) >= 20
    assert side.checksums_of(parts) == expected
    assert side._checksums_by_range(parts) == expected
    assert side._checksums_by_search(parts) == expected
    every_third = [p for p in parts[1:]][::3]
    assert side.checksums_of(every_third) == expected[1:][::3]
    # A bound a double cannot hold exactly is summed by searches, with the same answer.
    beyond = [*parts[:-1], Segment(parts[-1].lo, 2**60), Segment(2**60, None)]
    assert side.checksums_of(beyond) == [*expected, Checksum(0, 0)]
