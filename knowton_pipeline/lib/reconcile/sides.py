"""The stores as sides of a reconciliation: each answers the same questions about a key segment.

A side computes, for the live rows whose key is in a segment: the row count and the sum of their
`row_hash` (inside the store where it can), split points, and the canonical strings of the rows of a
small segment or of a list of keys. PostgreSQL is always the source; a ClickHouse mirror or an
Elasticsearch index is the target.
"""

from __future__ import annotations

import bisect as _bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime
from typing import Any, Protocol

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch
from psycopg import sql

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, SyncedTable
from knowton_pipeline.lib import canonical
from knowton_pipeline.lib.reconcile.bisect import Checksum, Key, Segment
from knowton_pipeline.lib.transform import format_timestamp

# Keys per query when rows are fetched by key (the in-flight re-check, incremental mode).
KEY_CHUNK = 2000
# Documents per Elasticsearch page when streaming an index.
ES_PAGE = 5000
NO_DAY: date | None = None


class Side(Protocol):
    """What the reconciler asks of a store."""

    label: str
    max_parts: int  # parts one split_checksums call may ask for

    def day_checksums(self) -> dict[date | None, Checksum]:
        """(count, checksum) of all live rows, per UTC creation day (None when the table has no creation day)."""
        ...

    def checksum(self, seg: Segment) -> Checksum: ...

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        """The checksums of `seg.split(points)`'s parts in one pass (`points` sorted, inside `seg`, above its lo)."""
        ...

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        """The smallest and largest key in `seg`, None when it is empty."""
        ...

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        """About `parts - 1` keys of this side inside `seg`, cutting it into parts of similar size."""
        ...

    def rows(self, seg: Segment) -> dict[Key, str]:
        """Key -> canonical string of every live row in `seg`."""
        ...

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        """Key -> canonical string of the live rows among `keys` (absent keys are left out)."""
        ...

    def changed_keys(self, since: datetime) -> set[Key]:
        """Keys of the live rows whose updated-at is at or after `since`."""
        ...


def single_key(table: SyncedTable) -> str:
    if len(table.key) != 1:
        raise ValueError(f"{table.name}: reconciliation needs a single-column key, the key is {table.key}")
    return table.key[0]


def _chunks(keys: Sequence[Key]) -> Iterator[list[Key]]:
    for i in range(0, len(keys), KEY_CHUNK):
        yield list(keys[i : i + KEY_CHUNK])


def _buckets(rows: Sequence[Sequence[Any]], parts: int) -> list[Checksum]:
    """Per-bucket (index, count, sum) rows as one checksum per part, empty parts included."""
    out = [Checksum(0, 0)] * parts
    for b, count, total in rows:
        out[int(b)] = Checksum(int(count), int(total))
    return out


def _sum_by_day(rows: Sequence[Sequence[Any]]) -> dict[date | None, Checksum]:
    return {r[0]: Checksum(int(r[1]), int(r[2])) for r in rows}


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresSide:
    """The source: a PostgreSQL table, its canonical rows spelled for the target's columns."""

    def __init__(self, conn: psycopg.Connection, table: SyncedTable, *, target: canonical.Target):
        self.conn, self.table, self.target = conn, table, target
        self.key = single_key(table)
        self.label = "postgresql"
        self.max_parts = 4096
        self._rel = sql.Identifier(table.schema, table.name)
        self._key_expr = sql.SQL('t.{} COLLATE "C"' if table.column(self.key).type == "text" else "t.{}").format(
            sql.Identifier(self.key)
        )

    def _range(self, seg: Segment) -> sql.Composable:
        return canonical.postgres_key_range(self.table, "t", seg.lo is not None, seg.hi is not None)

    def day_checksums(self) -> dict[date | None, Checksum]:
        day = (
            sql.SQL("(t.{} AT TIME ZONE 'UTC')::date").format(sql.Identifier(self.table.created_at))
            if self.table.created_at
            else sql.SQL("NULL::date")
        )
        query = sql.SQL("SELECT {day} AS d, count(*), coalesce(sum({hash}), 0) FROM {rel} AS t GROUP BY 1").format(
            day=day, hash=canonical.postgres_hash_sql(self.table, "t", target=self.target), rel=self._rel
        )
        return _sum_by_day(self.conn.execute(query).fetchall())

    def checksum(self, seg: Segment) -> Checksum:
        count, total = canonical.postgres_segment_checksum(self.conn, self.table, seg.lo, seg.hi, target=self.target)
        return Checksum(count, total)

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        # width_bucket counts the points at or below the key, compared in the key's (byte) collation.
        query = sql.SQL(
            "SELECT width_bucket({k}, %(points)s::{array}) AS b, count(*), coalesce(sum({hash}), 0) "
            "FROM {rel} AS t WHERE {range} GROUP BY b"
        ).format(
            k=self._key_expr,
            array=sql.SQL(canonical.PG_KEY_TYPES[self.table.column(self.key).type] + "[]"),
            hash=canonical.postgres_hash_sql(self.table, "t", target=self.target),
            rel=self._rel,
            range=self._range(seg),
        )
        params = {**canonical.segment_parameters(self.table, seg.lo, seg.hi), "points": list(points)}
        return _buckets(self.conn.execute(query, params).fetchall(), len(points) + 1)

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        query = sql.SQL("SELECT min({k}), max({k}) FROM {rel} AS t WHERE {range}").format(
            k=self._key_expr, rel=self._rel, range=self._range(seg)
        )
        row = self.conn.execute(query, canonical.segment_parameters(self.table, seg.lo, seg.hi)).fetchone()
        return None if row is None or row[0] is None else (row[0], row[1])

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        step = max(1, math.ceil(count / parts))
        query = sql.SQL(
            "SELECT k FROM (SELECT t.{key} AS k, row_number() OVER (ORDER BY {order}) AS rn FROM {rel} AS t "
            "WHERE {range}) s WHERE rn %% %(step)s = 1 AND rn > 1 ORDER BY rn"
        ).format(key=sql.Identifier(self.key), order=self._key_expr, rel=self._rel, range=self._range(seg))
        params = {**canonical.segment_parameters(self.table, seg.lo, seg.hi), "step": step}
        return [r[0] for r in self.conn.execute(query, params).fetchall()]

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = canonical.postgres_segment_rows_sql(
            self.table, target=self.target, lower_bound=seg.lo is not None, upper_bound=seg.hi is not None
        )
        rows = self.conn.execute(query, canonical.segment_parameters(self.table, seg.lo, seg.hi)).fetchall()
        return {r[0]: r[1] for r in rows}

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        query = sql.SQL("SELECT t.{key}, {canonical} FROM {rel} AS t WHERE t.{key} = ANY(%s)").format(
            key=sql.Identifier(self.key),
            canonical=canonical.postgres_canonical_sql(self.table, "t", target=self.target),
            rel=self._rel,
        )
        out: dict[Key, str] = {}
        for chunk in _chunks(keys):
            out.update({r[0]: r[1] for r in self.conn.execute(query, (chunk,)).fetchall()})
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise ValueError(f"{self.table.name} has no updated-at column: incremental mode cannot apply")
        query = sql.SQL("SELECT t.{key} FROM {rel} AS t WHERE t.{updated} >= %s").format(
            key=sql.Identifier(self.key), rel=self._rel, updated=sql.Identifier(self.table.updated_at)
        )
        return {r[0] for r in self.conn.execute(query, (since,)).fetchall()}


# ---------------------------------------------------------------------------------------------------------------
# ClickHouse


class ClickHouseSide:
    """A ReplacingMergeTree mirror, read with FINAL and without deleted rows."""

    def __init__(self, client: ClickHouseClient, table: SyncedTable, *, database: str = CLICKHOUSE_DATABASE):
        self.ch, self.table, self.database = client, table, database
        key = single_key(table)
        self.label = "clickhouse"
        # arrayCount compares each row with every point (PostgreSQL's width_bucket searches): keep splits small.
        self.max_parts = 256
        self._key = canonical.backtick(table.column(key).target_name)
        self._key_type = canonical.CH_KEY_TYPES[table.column(key).type]
        self._mirror = f"{canonical.backtick(database)}.{canonical.backtick(table.clickhouse_table)}"

    def _where(self, seg: Segment) -> str:
        return canonical.clickhouse_key_range(self.table, seg.lo is not None, seg.hi is not None)

    def day_checksums(self) -> dict[date | None, Checksum]:
        day = (
            f"toDate({canonical.backtick(self.table.column(self.table.created_at).target_name)}, 'UTC')"
            if self.table.created_at
            else "CAST(NULL AS Nullable(Date))"
        )
        query = (
            f"SELECT {day} AS d, count(), sum(toUInt128({canonical.clickhouse_hash_sql(self.table)})) "
            f"FROM {self._mirror} FINAL WHERE {self._where(Segment())} GROUP BY d"
        )
        return _sum_by_day(self.ch.query(query).result_rows)

    def checksum(self, seg: Segment) -> Checksum:
        count, total = canonical.clickhouse_segment_checksum(
            self.ch, self.table, seg.lo, seg.hi, database=self.database
        )
        return Checksum(count, total)

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        query = (
            f"SELECT arrayCount(p -> p <= {self._key}, {{points:Array({self._key_type})}}) AS b, count(), "
            f"sum(toUInt128({canonical.clickhouse_hash_sql(self.table)})) FROM {self._mirror} FINAL "
            f"WHERE {self._where(seg)} GROUP BY b"
        )
        params = {**canonical.segment_parameters(self.table, seg.lo, seg.hi), "points": list(points)}
        return _buckets(self.ch.query(query, parameters=params).result_rows, len(points) + 1)

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        query = f"SELECT min({self._key}), max({self._key}), count() FROM {self._mirror} FINAL WHERE {self._where(seg)}"
        lo, hi, n = self.ch.query(
            query, parameters=canonical.segment_parameters(self.table, seg.lo, seg.hi)
        ).result_rows[0]
        return None if not n else (lo, hi)

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        step = max(1, math.ceil(count / parts))
        query = (
            f"SELECT k FROM (SELECT {self._key} AS k, row_number() OVER (ORDER BY {self._key}) AS rn "
            f"FROM {self._mirror} FINAL WHERE {self._where(seg)}) WHERE rn % {{step:UInt64}} = 1 AND rn > 1 ORDER BY k"
        )
        params = {**canonical.segment_parameters(self.table, seg.lo, seg.hi), "step": step}
        return [r[0] for r in self.ch.query(query, parameters=params).result_rows]

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = canonical.clickhouse_segment_rows_sql(
            self.table, database=self.database, lower_bound=seg.lo is not None, upper_bound=seg.hi is not None
        )
        result = self.ch.query(query, parameters=canonical.segment_parameters(self.table, seg.lo, seg.hi))
        return {r[0]: r[1] for r in result.result_rows}

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        query = (
            f"SELECT {self._key}, {canonical.clickhouse_canonical_sql(self.table)} FROM {self._mirror} FINAL "
            f"WHERE {self._where(Segment())} AND {self._key} IN {{keys:Array({self._key_type})}}"
        )
        out: dict[Key, str] = {}
        for chunk in _chunks(keys):
            out.update({r[0]: r[1] for r in self.ch.query(query, parameters={"keys": chunk}).result_rows})
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise ValueError(f"{self.table.name} has no updated-at column: incremental mode cannot apply")
        updated = canonical.backtick(self.table.column(self.table.updated_at).target_name)
        query = (
            f"SELECT {self._key} FROM {self._mirror} FINAL WHERE {self._where(Segment())} "
            f"AND {updated} >= {{since:DateTime64(6, 'UTC')}}"
        )
        since_text = format_timestamp(since).rstrip("Z").replace("T", " ")
        return {r[0] for r in self.ch.query(query, parameters={"since": since_text}).result_rows}


# ---------------------------------------------------------------------------------------------------------------
# Elasticsearch


def _es_day(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


class ElasticsearchSide:
    """A search index (through its alias), compared on the columns it holds.

    With `documents=False` segment checksums are sums of the hash the writer stored in each document,
    computed by Elasticsearch (fast; verifies what the pipeline wrote). With `documents=True` every live
    document is streamed once (point in time + search_after) and hashed from its `_source`, so an edit
    made directly in the index is caught too; segments are then answered from memory.
    """

    def __init__(
        self,
        es: Elasticsearch,
        table: SyncedTable,
        *,
        documents: bool = False,
        index: str | None = None,
        progress: Callable[[int], None] | None = None,
    ):
        if table.elasticsearch_index is None:
            raise ValueError(f"{table.name} has no Elasticsearch index")
        self.es, self.table = es, table
        self.index = index or table.elasticsearch_index
        key = single_key(table)
        self.key_field = table.column(key).target_name
        self.documents = documents
        self.label = "elasticsearch"
        # A filters aggregation costs a query per part; from memory (documents mode) parts are cheap.
        self.max_parts = 4096 if documents else 256
        self._progress = progress
        self._created = table.column(table.created_at).target_name if table.created_at else None
        self._keys: list[Key] = []
        self._prefix: list[int] = [0]  # prefix sums of the streamed hashes, in key order
        self._days: dict[date | None, Checksum] = {}
        self._loaded = not documents

    # --- streaming (documents mode) ----------------------------------------------------------------
    def stream(self, query: dict[str, Any], fields: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every document matching `query`, in key order, through a point in time (a consistent view)."""
        pit = self.es.open_point_in_time(index=self.index, keep_alive="2m")["id"]
        try:
            after: list[Any] | None = None
            while True:
                body: dict[str, Any] = {
                    "size": ES_PAGE,
                    "query": query,
                    "pit": {"id": pit, "keep_alive": "2m"},
                    "sort": [{self.key_field: "asc"}, {"_shard_doc": "asc"}],
                    "_source": fields if fields is not None else canonical.es_source_fields(self.table),
                    "track_total_hits": False,
                }
                if after is not None:
                    body["search_after"] = after
                page = self.es.search(**body)
                pit = page.get("pit_id", pit)
                hits = page["hits"]["hits"]
                if not hits:
                    return
                for hit in hits:
                    yield hit["_source"]
                after = hits[-1]["sort"]
        finally:
            self.es.close_point_in_time(id=pit)

    def _load(self) -> None:
        """Stream and hash every live document, once (on first use, so it can overlap PostgreSQL's scan)."""
        if self._loaded:
            return
        self._loaded = True
        days: dict[date | None, list[int]] = defaultdict(lambda: [0, 0])
        fields = canonical.es_source_fields(self.table)
        total = 0
        for source in self.stream(canonical.es_segment_query(self.table), fields):
            h = canonical.row_hash(canonical.canonical_from_es_source(self.table, source))
            self._keys.append(source[self.key_field])
            total += h
            self._prefix.append(total)
            acc = days[_es_day(source.get(self._created)) if self._created else None]
            acc[0] += 1
            acc[1] += h
            if self._progress and len(self._keys) % 100_000 == 0:
                self._progress(len(self._keys))
        self._days = {d: Checksum(c, s) for d, (c, s) in days.items()}

    def _span(self, seg: Segment) -> tuple[int, int]:
        self._load()
        lo = 0 if seg.lo is None else _bisect.bisect_left(self._keys, seg.lo)
        hi = len(self._keys) if seg.hi is None else _bisect.bisect_left(self._keys, seg.hi)
        return lo, hi

    # --- the side --------------------------------------------------------------------------------
    def _hash_sums(self) -> dict[str, Any]:
        return {part: {"sum": {"field": part}} for part in canonical.ES_HASH_PARTS}

    @staticmethod
    def _from_sums(aggs: dict[str, Any], count: int) -> Checksum:
        parts = [aggs[p]["value"] or 0 for p in canonical.ES_HASH_PARTS]
        return Checksum(count, canonical.es_hash_from_parts(*parts))

    def day_checksums(self) -> dict[date | None, Checksum]:
        if self.documents:
            self._load()
            return dict(self._days)
        query = canonical.es_segment_query(self.table)
        if not self._created:
            response = self.es.search(
                index=self.index, size=0, query=query, aggs=self._hash_sums(), track_total_hits=True
            )
            return {NO_DAY: self._from_sums(response["aggregations"], response["hits"]["total"]["value"])}
        response = self.es.search(
            index=self.index,
            size=0,
            query=query,
            aggs={
                "days": {
                    "date_histogram": {"field": self._created, "calendar_interval": "day", "time_zone": "UTC"},
                    "aggs": self._hash_sums(),
                }
            },
        )
        out = {}
        for bucket in response["aggregations"]["days"]["buckets"]:
            if bucket["doc_count"]:
                day = date.fromisoformat(bucket["key_as_string"][:10])
                out[day] = self._from_sums(bucket, bucket["doc_count"])
        return out

    def checksum(self, seg: Segment) -> Checksum:
        if self.documents:
            lo, hi = self._span(seg)
            return Checksum(hi - lo, self._prefix[hi] - self._prefix[lo])
        response = self.es.search(
            index=self.index,
            size=0,
            query=canonical.es_segment_query(self.table, seg.lo, seg.hi),
            aggs=self._hash_sums(),
            track_total_hits=True,
        )
        return self._from_sums(response["aggregations"], response["hits"]["total"]["value"])

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        parts = seg.split(points)
        if self.documents:
            return [self.checksum(part) for part in parts]
        filters = {
            str(i): canonical.es_segment_query(self.table, part.lo, part.hi)["bool"]["filter"][0]
            if part.lo is not None or part.hi is not None
            else {"match_all": {}}
            for i, part in enumerate(parts)
        }
        response = self.es.search(
            index=self.index,
            size=0,
            query=canonical.es_segment_query(self.table, seg.lo, seg.hi),
            aggs={"parts": {"filters": {"filters": filters}, "aggs": self._hash_sums()}},
        )
        buckets = response["aggregations"]["parts"]["buckets"]
        return [self._from_sums(buckets[str(i)], buckets[str(i)]["doc_count"]) for i in range(len(parts))]

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        if self.documents:
            lo, hi = self._span(seg)
            return None if lo == hi else (self._keys[lo], self._keys[hi - 1])
        query = canonical.es_segment_query(self.table, seg.lo, seg.hi)
        ends = []
        for order in ("asc", "desc"):
            hits = self.es.search(
                index=self.index, size=1, query=query, sort=[{self.key_field: order}], _source=[self.key_field]
            )["hits"]["hits"]
            if not hits:
                return None
            ends.append(hits[0]["_source"][self.key_field])
        return ends[0], ends[1]

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        if self.documents:
            lo, hi = self._span(seg)
            keys: Sequence[Key] = self._keys[lo:hi]
        else:
            keys = [
                s[self.key_field]
                for s in self.stream(canonical.es_segment_query(self.table, seg.lo, seg.hi), [self.key_field])
            ]
        step = max(1, math.ceil(len(keys) / parts))
        return list(keys[step::step])

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = canonical.es_segment_query(self.table, seg.lo, seg.hi)
        return {s[self.key_field]: canonical.canonical_from_es_source(self.table, s) for s in self.stream(query)}

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        for chunk in _chunks(keys):
            query = canonical.es_segment_query(self.table)
            query["bool"]["filter"].append({"terms": {self.key_field: chunk}})
            response = self.es.search(
                index=self.index, size=len(chunk), query=query, _source=canonical.es_source_fields(self.table)
            )
            for hit in response["hits"]["hits"]:
                source = hit["_source"]
                out[source[self.key_field]] = canonical.canonical_from_es_source(self.table, source)
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise ValueError(f"{self.table.name} has no updated-at column: incremental mode cannot apply")
        query = canonical.es_segment_query(self.table)
        updated = self.table.column(self.table.updated_at).target_name
        query["bool"]["filter"].append({"range": {updated: {"gte": format_timestamp(since)}}})
        return {s[self.key_field] for s in self.stream(query, [self.key_field])}
