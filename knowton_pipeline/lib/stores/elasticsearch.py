"""Elasticsearch, the search store: its document spelling of canonical rows, its reconcile sides and its writer.

Each synced table with a search index has an alias (`knowton-users`) over a versioned index (`knowton-users-v1`).
Documents are written with `version_type=external_gte`; a delete is a versioned tombstone (`is_deleted: true`)
that the alias's filter hides, so a stale write can never resurrect it. Besides its columns a live document stores
the hash of its own canonical row, so the index can be checksummed without any document travelling.
"""

from __future__ import annotations

import bisect as _bisect
import itertools
import json
import math
import multiprocessing
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from queue import Empty
from typing import Any

import elastic_transport
import orjson
from elasticsearch import ApiError, Elasticsearch
from elasticsearch import helpers as es_helpers

from knowton_pipeline.catalog import TABLES, Column, SyncedTable
from knowton_pipeline.lib.canonical import INVALID, SEPARATOR, Field, Shape, plan, row_hash, spell
from knowton_pipeline.lib.reconcile.bisect import Checksum, Key, Segment, runs
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import SQL_ROOT, read_json
from knowton_pipeline.lib.stores.base import (
    NO_DAY,
    RANGES_PER_QUERY,
    Prepared,
    Side,
    StoreRefusedError,
    TransientStoreError,
    WriteItem,
    WriteOutcome,
    checksums_by_runs,
    chunks,
    no_updated_at,
    single_key,
    tombstones_written,
)
from knowton_pipeline.lib.transform import (
    ES_DELETED_FIELD,
    ES_INDEXED_AT_FIELD,
    ES_VERSION_FIELD,
    document_id,
    exact_decimal,
    format_timestamp,
    to_es_document,
)

# Documents per page when streaming an index.
ES_PAGE = 5000
_MISSING: Any = object()


# ---------------------------------------------------------------------------------------------------------------
# Document spelling: a `_source` read back as the row and the derived fields it holds

# Elasticsearch `_source` -> Python value, the inverse of to_es_document's per-column conversion. Raises
# TypeError/ValueError for what to_es_document can never have written.


def _es_numeric_for(scale: int) -> Callable[[Any], Decimal]:
    def read(value: Any) -> Decimal:
        if type(value) is float:
            # Not what the transform writes (it sends an exact string), but the same number if it is exact.
            value = repr(value)
        if type(value) not in (str, int):
            raise TypeError(f"expected a decimal string, got {type(value).__name__}")
        return exact_decimal(value, scale)

    return read


def _es_timestamp(value: Any) -> datetime:
    if type(value) is not str:
        raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.utcoffset() is None:
        raise ValueError("timestamp without a zone")
    return parsed


def _es_same_type(kind: type) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return read


def _es_text_array(value: Any) -> list[str]:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise TypeError("expected a list of strings")
    return value


def _es_reader(column: Column) -> Callable[[Any], Any]:
    return {
        "text": _es_same_type(str),
        "int": _es_same_type(int),
        "bigint": _es_same_type(int),
        "bool": _es_same_type(bool),
        "numeric": _es_numeric_for(column.scale or 0),
        "timestamptz": _es_timestamp,
        "text[]": _es_text_array,
        "jsonb": lambda value: value,
    }[column.type]


@dataclass(frozen=True)
class _DocumentField:
    field: Field
    read: Callable[[Any], Any]  # `_source` value -> Python value, as psycopg gives it


_DOCUMENT_PLANS: dict[int, tuple[SyncedTable, tuple[_DocumentField, ...], tuple[_DocumentField, ...]]] = {}


def _document_fields(table: SyncedTable) -> tuple[tuple[_DocumentField, ...], tuple[_DocumentField, ...]]:
    """The document's column fields and derived fields, each with its reader (built once per table)."""
    cached = _DOCUMENT_PLANS.get(id(table))
    if cached is not None and cached[0] is table:
        return cached[1], cached[2]
    shape = plan(table, "document")
    columns = tuple(_DocumentField(f, _es_reader(f.column)) for f in shape.columns)
    derived = tuple(_DocumentField(f, _es_reader(f.column)) for f in shape.derived)
    _DOCUMENT_PLANS[id(table)] = (table, columns, derived)
    return columns, derived


def row_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> dict[str, Any]:
    """The row an Elasticsearch `_source` holds, keyed by PostgreSQL column name and Python-typed like a psycopg
    row: the inverse of `to_es_document` for the column fields (metadata and derived fields are ignored; see
    `enrichment_from_es_source`). Raises ValueError for a missing field or a value `to_es_document` cannot have
    written."""
    return _read_es_fields(table, source, _document_fields(table)[0])


def enrichment_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> dict[str, Any]:
    """The derived fields an Elasticsearch `_source` holds, Python-typed as the enriched query returns them
    (the `enrichment` of `to_es_document` and `canonical_from_row`). Raises ValueError as `row_from_es_source`."""
    return _read_es_fields(table, source, _document_fields(table)[1])


def _read_es_fields(table: SyncedTable, source: Mapping[str, Any], fields: Sequence[_DocumentField]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for doc_field in fields:
        field, column = doc_field.field, doc_field.field.column
        if column.target_name not in source:
            raise ValueError(f"{table.name}.{column.name}: field {column.target_name!r} missing from the document")
        value = source[column.target_name]
        if value is None:
            if not (column.nullable or field.none_is_json_null):
                raise ValueError(f"{table.name}.{column.name}: null in a NOT NULL column")
            row[column.name] = None
            continue
        try:
            row[column.name] = doc_field.read(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{table.name}.{column.name}: {exc}") from None
    return row


def _es_field(doc_field: _DocumentField, source: Mapping[str, Any]) -> str:
    """One field's canonical text in a `_source`: the definition `canonical_from_es_source`'s spellers keep."""
    field, column = doc_field.field, doc_field.field.column
    value = source.get(column.target_name, _MISSING)
    if value is _MISSING:
        return INVALID
    if value is None:
        if column.nullable or field.none_is_json_null:
            return spell(field, None)
        return INVALID
    try:
        return field.python(doc_field.read(value))
    except (TypeError, ValueError, RecursionError):
        return INVALID


# A timestamp spelled as the canonical row spells it (`transform.format_timestamp`): reading and spelling it again
# gives it back, once datetime has checked it is a real instant.
_CANONICAL_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def _canonical_decimal(scale: int) -> re.Pattern[str]:
    """A decimal string spelled as the canonical row spells numeric(p, scale): no sign but a minus, no leading zero,
    exactly `scale` fraction digits. Negative zero is left out (it reads as zero), and so are numbers past 38
    integer digits (the full reading decides those)."""
    fraction = rf"\.[0-9]{{{scale}}}" if scale else ""
    return re.compile(rf"(?:-(?!0{fraction}$))?(?:0|[1-9][0-9]{{0,37}}){fraction}")


def _es_speller(doc_field: _DocumentField) -> Callable[[Mapping[str, Any]], str]:
    """`_es_field` for one field; a null, or a timestamp, decimal, integer, boolean or text already in its canonical
    spelling, is checked, not read and spelled again."""
    column = doc_field.field.column
    name = column.target_name
    null = _es_field(doc_field, {name: None})  # a null's spelling, or INVALID in a NOT NULL field
    if column.type == "timestamptz":

        def timestamp(source: Mapping[str, Any]) -> str:
            value = source.get(name, _MISSING)
            if value is None:
                return null
            # (Hour 24 is left to the full reading: some Pythons read 24:00 as the next day's midnight.)
            if type(value) is str and _CANONICAL_TIMESTAMP.fullmatch(value) and value[11:13] != "24":
                try:
                    datetime.fromisoformat(value)
                except ValueError:
                    return INVALID
                return value
            return _es_field(doc_field, source)

        return timestamp
    if column.type == "numeric":
        canonical = _canonical_decimal(column.scale or 0)

        def decimal(source: Mapping[str, Any]) -> str:
            value = source.get(name, _MISSING)
            if value is None:
                return null
            return value if type(value) is str and canonical.fullmatch(value) else _es_field(doc_field, source)

        return decimal
    if column.type in ("int", "bigint"):

        def integer(source: Mapping[str, Any]) -> str:
            value = source.get(name, _MISSING)
            if value is None:
                return null
            return str(value) if type(value) is int else _es_field(doc_field, source)

        return integer
    if column.type == "bool":
        spelled = {True: doc_field.field.python(True), False: doc_field.field.python(False)}

        def boolean(source: Mapping[str, Any]) -> str:
            value = source.get(name, _MISSING)
            if value is None:
                return null
            return spelled[value] if type(value) is bool else _es_field(doc_field, source)

        return boolean
    if column.type == "text":

        def text(source: Mapping[str, Any]) -> str:
            value = source.get(name, _MISSING)
            if value is None:
                return null
            if type(value) is str and "\\" not in value and "\t" not in value:
                return value
            return _es_field(doc_field, source)

        return text
    return lambda source: _es_field(doc_field, source)


_SPELLERS: dict[int, tuple[SyncedTable, tuple[Callable[[Mapping[str, Any]], str], ...]]] = {}


def canonical_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> str:
    """The canonical string of an Elasticsearch `_source` (columns marked `in_elasticsearch`, then the derived
    fields). Never raises for a bad value: a field `to_es_document` cannot have written (hand-edited, missing) is
    `\\!`, so the document shows as different instead of aborting its segment. Each field is `_es_field`'s."""
    cached = _SPELLERS.get(id(table))
    if cached is None or cached[0] is not table:
        columns, derived = _document_fields(table)
        cached = _SPELLERS[id(table)] = (table, tuple(_es_speller(f) for f in (*columns, *derived)))
    return SEPARATOR.join([speller(source) for speller in cached[1]])


# The stored hash split into three 20-bit parts: Elasticsearch sums numbers as doubles, exact below 2**53, so each
# part's sum stays exact up to 2**33 documents and the three sums give the exact 60-bit sum.
ES_HASH_FIELD = "row_hash"
ES_HASH_PARTS = ("row_hash_hi", "row_hash_mid", "row_hash_lo")
_PART_BITS = 20
_PART_MASK = (1 << _PART_BITS) - 1


def es_hash_fields(table: SyncedTable, document: Mapping[str, Any]) -> dict[str, Any]:
    """The hash fields the writer stores beside a live document's columns: `row_hash` (decimal text) and its parts."""
    h = row_hash(canonical_from_es_source(table, document))
    return {
        ES_HASH_FIELD: str(h),
        ES_HASH_PARTS[0]: h >> (2 * _PART_BITS),
        ES_HASH_PARTS[1]: (h >> _PART_BITS) & _PART_MASK,
        ES_HASH_PARTS[2]: h & _PART_MASK,
    }


def es_hash_from_parts(hi: float, mid: float, lo: float) -> int:
    """The exact sum of stored hashes from the sums of their parts (as Elasticsearch's `sum` returns them)."""
    return (int(hi) << (2 * _PART_BITS)) + (int(mid) << _PART_BITS) + int(lo)


def es_source_fields(table: SyncedTable) -> list[str]:
    """The `_source` fields a canonical row reads (pass as `_source_includes`), plus the tombstone flag."""
    return [*plan(table, "document").targets, ES_DELETED_FIELD]


def es_segment_query(table: SyncedTable, lo: Any = None, hi: Any = None) -> dict[str, Any]:
    """An Elasticsearch query for the live documents whose key is in [lo, hi) (None: unbounded). A keyword
    range compares UTF-8 bytes, the order of PostgreSQL's COLLATE "C" and of ClickHouse strings."""
    if len(table.key) != 1:
        raise ValueError(f"{table.name}: a key segment query needs a single-column key, the key is {table.key}")
    bounds = {}
    if lo is not None:
        bounds["gte"] = lo
    if hi is not None:
        bounds["lt"] = hi
    key = table.column(table.key[0]).target_name
    filters = [{"range": {key: bounds}}] if bounds else []
    return {"bool": {"filter": filters, "must_not": [{"term": {ES_DELETED_FIELD: True}}]}}


# ---------------------------------------------------------------------------------------------------------------
# The reconcile sides


def _es_day(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def stream_documents(
    es: Elasticsearch,
    index: str,
    key_field: str,
    query: dict[str, Any],
    fields: list[str],
    *,
    part: tuple[int, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """The `_source` of every document matching `query`, in key order, through a point in time (a consistent
    view). `part` (i, n) reads only slice i of n: the slices of one point in time partition its documents."""
    pit = es.open_point_in_time(index=index, keep_alive="2m")["id"]
    try:
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "size": ES_PAGE,
                "query": query,
                "pit": {"id": pit, "keep_alive": "2m"},
                "sort": [{key_field: "asc"}, {"_shard_doc": "asc"}],
                "_source": fields,
                "track_total_hits": False,
                "filter_path": "pit_id,hits.hits._source,hits.hits.sort",
            }
            if part is not None and part[1] > 1:
                body["slice"] = {"id": part[0], "max": part[1]}
            if after is not None:
                body["search_after"] = after
            page = es.search(**body)
            pit = page.get("pit_id", pit)
            hits = page.get("hits", {}).get("hits", [])
            if not hits:
                return
            for hit in hits:
                yield hit["_source"]
            after = hits[-1]["sort"]
    finally:
        es.close_point_in_time(id=pit)


def _whole(answer: Mapping[str, Any], meta: Any, what: str) -> Mapping[str, Any]:
    """A search's answer, refused unless every shard answered in time: sums over part of an index are no checksum."""
    failed = answer.get("_shards", {}).get("failed", 0)
    if "error" in answer or failed or answer.get("timed_out"):
        reason = answer.get("error") or (f"{failed} shard(s) failed" if failed else "timed out")
        raise ApiError(f"{what}: {reason}", meta=meta, body=answer)
    return answer


def _exact_double(bound: Key | None) -> bool:
    """Whether a part's bound is unbounded or an integer a double holds exactly."""
    return bound is None or (isinstance(bound, int) and abs(bound) < 2**53)


class _IndexSide:
    """A search index (through its alias), compared on the fields its documents hold."""

    label = "elasticsearch"
    max_parts = 256

    def __init__(self, es: Elasticsearch, table: SyncedTable, *, index: str | None = None):
        if table.elasticsearch_index is None:
            raise ValueError(f"{table.name} has no Elasticsearch index")
        self.es, self.table = es, table
        self.index = index or table.elasticsearch_index
        self.key_field = table.column(single_key(table)).target_name
        self._integer_key = table.column(single_key(table)).type in ("int", "bigint")
        self._created = table.column(table.created_at).target_name if table.created_at else None

    def stream(self, query: dict[str, Any], fields: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every document matching `query`, in key order, through a point in time (a consistent view)."""
        fields = fields if fields is not None else es_source_fields(self.table)
        return stream_documents(self.es, self.index, self.key_field, query, fields)

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = es_segment_query(self.table, seg.lo, seg.hi)
        return {s[self.key_field]: canonical_from_es_source(self.table, s) for s in self.stream(query)}

    def _in_runs(self, segments: Sequence[Segment]) -> dict[str, Any]:
        """A query for the live documents whose key is in any of `segments`' runs (a `should` of key ranges)."""
        query = es_segment_query(self.table)
        ranges = [es_segment_query(self.table, run.lo, run.hi)["bool"]["filter"] for run, _ in runs(segments)]
        if all(ranges):  # an unbounded run covers every key: no range to add
            should = [r[0] for r in ranges]
            query["bool"]["filter"].append({"bool": {"should": should, "minimum_should_match": 1}})
        return query

    def rows_of(self, segments: Sequence[Segment]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        for batch in chunks(segments, RANGES_PER_QUERY):
            for source in self.stream(self._in_runs(batch)):
                out[source[self.key_field]] = canonical_from_es_source(self.table, source)
        return out

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        return checksums_by_runs(self, parts)  # type: ignore[arg-type]

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        for chunk in chunks(keys):
            query = es_segment_query(self.table)
            query["bool"]["filter"].append({"terms": {self.key_field: chunk}})
            response = self.es.search(
                index=self.index, size=len(chunk), query=query, _source=es_source_fields(self.table)
            )
            for hit in response["hits"]["hits"]:
                source = hit["_source"]
                out[source[self.key_field]] = canonical_from_es_source(self.table, source)
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise no_updated_at(self.table)
        query = es_segment_query(self.table)
        updated = self.table.column(self.table.updated_at).target_name
        query["bool"]["filter"].append({"range": {updated: {"gte": format_timestamp(since)}}})
        return {s[self.key_field] for s in self.stream(query, [self.key_field])}


class StoredHashSide(_IndexSide):
    """Checksums are sums of the hash the writer stored in each document, computed by Elasticsearch: fast, and it
    verifies what the pipeline wrote (an edit made directly in the index is `DocumentStreamSide`'s to find)."""

    # Parts are summed by a range aggregation (integer keys) or one search each in a multi-search request, so that
    # every document is read once whatever the number of parts (a filters aggregation with sums under it tests
    # every document against every part: 14 s for 256 parts of a million documents, against 0.1 s).
    max_parts = 4096
    searches_per_request = 1024

    @staticmethod
    def _hash_sums() -> dict[str, Any]:
        return {part: {"sum": {"field": part}} for part in ES_HASH_PARTS}

    @staticmethod
    def _from_sums(aggs: dict[str, Any], count: int) -> Checksum:
        parts = [aggs[p]["value"] or 0 for p in ES_HASH_PARTS]
        return Checksum(count, es_hash_from_parts(*parts))

    def day_checksums(self) -> dict[date | None, Checksum]:
        query = es_segment_query(self.table)
        if not self._created:
            response = self.es.search(
                index=self.index, size=0, query=query, aggs=self._hash_sums(), track_total_hits=True
            )
            _whole(response.body, response.meta, f"summing {self.index}")
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
        _whole(response.body, response.meta, f"summing {self.index} by day")
        for bucket in response["aggregations"]["days"]["buckets"]:
            if bucket["doc_count"]:
                day = date.fromisoformat(bucket["key_as_string"][:10])
                out[day] = self._from_sums(bucket, bucket["doc_count"])
        return out

    def checksum(self, seg: Segment) -> Checksum:
        response = self.es.search(
            index=self.index,
            size=0,
            query=es_segment_query(self.table, seg.lo, seg.hi),
            aggs=self._hash_sums(),
            track_total_hits=True,
        )
        _whole(response.body, response.meta, f"summing {self.index}")
        return self._from_sums(response["aggregations"], response["hits"]["total"]["value"])

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        return self.checksums_of(seg.split(points))

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        if self._integer_key and all(_exact_double(b) for part in parts for b in (part.lo, part.hi)):
            return self._checksums_by_range(parts)
        return self._checksums_by_search(parts)

    def _checksums_by_range(self, parts: Sequence[Segment]) -> list[Checksum]:
        """A range aggregation over the runs the parts make up (RANGES_PER_QUERY parts a request, so that the runs'
        query stays within a search's clause limit): a document finds its parts by its key. The aggregation's
        bounds are doubles, exact here: every bound is an integer within 2**53 (a key beyond it still compares
        right with such a bound, as rounding keeps the order)."""
        out: list[Checksum] = []
        for batch in chunks(parts, RANGES_PER_QUERY):
            ranges = [
                {"key": str(i)}
                | ({"from": p.lo} if p.lo is not None else {})
                | ({"to": p.hi} if p.hi is not None else {})
                for i, p in enumerate(batch)
            ]
            response = self.es.search(
                index=self.index,
                size=0,
                query=self._in_runs(batch),
                aggs={
                    "parts": {
                        "range": {"field": self.key_field, "keyed": True, "ranges": ranges},
                        "aggs": self._hash_sums(),
                    }
                },
            )
            _whole(response.body, response.meta, f"summing {self.index} by key ranges")
            found = response["aggregations"]["parts"]["buckets"]
            out += [self._from_sums(found[str(i)], found[str(i)]["doc_count"]) for i in range(len(batch))]
        return out

    def _checksums_by_search(self, parts: Sequence[Segment]) -> list[Checksum]:
        """One search per part (its key range, summed), sent in multi-search requests."""
        out: list[Checksum] = []
        for batch in chunks(parts, self.searches_per_request):
            searches: list[dict[str, Any]] = []
            for part in batch:
                searches.append({"index": self.index})
                searches.append(
                    {
                        "size": 0,
                        "query": es_segment_query(self.table, part.lo, part.hi),
                        "aggs": self._hash_sums(),
                        "track_total_hits": True,
                    }
                )
            response = self.es.msearch(searches=searches)
            for part, answer in zip(batch, response["responses"], strict=True):
                # One part's failure leaves no verdict, as a failed request does.
                _whole(answer, response.meta, f"summing {self.index} for keys in [{part.lo!r}, {part.hi!r})")
                out.append(self._from_sums(answer["aggregations"], answer["hits"]["total"]["value"]))
        return out

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        query = es_segment_query(self.table, seg.lo, seg.hi)
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
        query = es_segment_query(self.table, seg.lo, seg.hi)
        keys = [s[self.key_field] for s in self.stream(query, [self.key_field])]
        step = max(1, math.ceil(len(keys) / parts))
        return keys[step::step]


@dataclass
class HashedDocuments:
    """Streamed documents hashed: keys in stream order, their row hashes, and (count, sum) per creation day."""

    keys: list[Key]
    hashes: list[int]
    days: dict[date | None, list[int]]


def hash_documents(
    table: SyncedTable,
    documents: Iterator[dict[str, Any]],
    key_field: str,
    created_field: str | None,
    progress: Callable[[int], None] | None = None,
    every: int = 100_000,
) -> HashedDocuments:
    out = HashedDocuments([], [], defaultdict(lambda: [0, 0]))
    for source in documents:
        h = row_hash(canonical_from_es_source(table, source))
        out.keys.append(source[key_field])
        out.hashes.append(h)
        acc = out.days[_es_day(source.get(created_field)) if created_field else None]
        acc[0] += 1
        acc[1] += h
        if progress and len(out.keys) % every == 0:
            progress(every)
    if progress and len(out.keys) % every:
        progress(len(out.keys) % every)
    out.days = dict(out.days)
    return out


@dataclass(frozen=True)
class _HashPart:
    """One slice of a point in time, streamed and hashed in a worker process with a client of its own."""

    nodes: tuple[elastic_transport.NodeConfig, ...]  # the parent client's nodes (with its auth headers)
    table: SyncedTable
    index: str
    key_field: str
    created_field: str | None
    query: dict[str, Any]
    fields: list[str]
    part: tuple[int, int]


_progress_queue: Any = None  # in a worker process: where it reports how many documents it hashed


def _init_hash_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _hash_part(task: _HashPart) -> HashedDocuments:
    with Elasticsearch(list(task.nodes), request_timeout=300) as es:
        documents = stream_documents(es, task.index, task.key_field, task.query, task.fields, part=task.part)
        report = _progress_queue.put if _progress_queue is not None else None
        return hash_documents(task.table, documents, task.key_field, task.created_field, report, every=20_000)


def default_hash_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class DocumentStreamSide(_IndexSide):
    """Every live document is streamed once (point in time + search_after) and hashed from its `_source`, so an
    edit made directly in the index is caught too; segments are then answered from memory.

    From `parallel_from` live documents on, the point in time is read in `workers` slices, each streamed and
    hashed by a process of its own: hashing is Python, so threads would share one core. The slices come back
    in key order each and are merged."""

    # From memory, parts are cheap.
    max_parts = 4096
    parallel_from = 100_000

    def __init__(
        self,
        es: Elasticsearch,
        table: SyncedTable,
        *,
        index: str | None = None,
        progress: Callable[[int], None] | None = None,
        workers: int | None = None,
    ):
        super().__init__(es, table, index=index)
        self._progress = progress
        self.workers = default_hash_workers() if workers is None else workers
        self._keys: list[Key] = []
        self._prefix: list[int] = [0]  # prefix sums of the streamed hashes, in key order
        self._days: dict[date | None, Checksum] = {}
        self._loaded = False
        self._hashed = 0

    def _report(self, n: int) -> None:
        before, self._hashed = self._hashed, self._hashed + n
        if self._progress and before // 100_000 != self._hashed // 100_000:
            self._progress(self._hashed)

    def _load(self) -> None:
        """Stream and hash every live document, once (on first use, so it can overlap PostgreSQL's scan)."""
        if self._loaded:
            return
        self._loaded = True
        query, fields = es_segment_query(self.table), es_source_fields(self.table)
        parts = 1
        if self.workers > 1 and self.es.count(index=self.index, query=query)["count"] >= self.parallel_from:
            parts = self.workers
        if parts == 1:
            hashed = [
                hash_documents(self.table, self.stream(query, fields), self.key_field, self._created, self._report)
            ]
        else:
            hashed = self._hash_in_parts(query, fields, parts)
        keys = [k for h in hashed for k in h.keys]
        hashes = [v for h in hashed for v in h.hashes]
        if len(hashed) > 1:
            # Each slice is in key order: the sort merges sorted runs.
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys, hashes = [keys[i] for i in order], [hashes[i] for i in order]
        self._keys = keys
        self._prefix = list(itertools.accumulate(hashes, initial=0))
        days: dict[date | None, list[int]] = defaultdict(lambda: [0, 0])
        for h in hashed:
            for day, (count, total) in h.days.items():
                days[day][0] += count
                days[day][1] += total
        self._days = {d: Checksum(c, s) for d, (c, s) in days.items()}

    def _hash_in_parts(self, query: dict[str, Any], fields: list[str], parts: int) -> list[HashedDocuments]:
        nodes = tuple(node.config for node in self.es.transport.node_pool.all())
        tasks = [
            _HashPart(nodes, self.table, self.index, self.key_field, self._created, query, fields, (i, parts))
            for i in range(parts)
        ]
        # spawn: the caller may hold threads (a Dagster run, a sink) that a fork would copy mid-lock.
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        with ProcessPoolExecutor(parts, mp_context=context, initializer=_init_hash_worker, initargs=(queue,)) as pool:
            futures = [pool.submit(_hash_part, task) for task in tasks]
            while not all(f.done() for f in futures):
                with suppress(Empty):
                    self._report(queue.get(timeout=0.5))
        # The workers have exited, so what they reported last is all in the queue: count it too.
        with suppress(Empty):
            while True:
                self._report(queue.get(timeout=0.1))
        return [f.result() for f in futures]

    def _span(self, seg: Segment) -> tuple[int, int]:
        self._load()
        lo = 0 if seg.lo is None else _bisect.bisect_left(self._keys, seg.lo)
        hi = len(self._keys) if seg.hi is None else _bisect.bisect_left(self._keys, seg.hi)
        return lo, hi

    def day_checksums(self) -> dict[date | None, Checksum]:
        self._load()
        return dict(self._days)

    def checksum(self, seg: Segment) -> Checksum:
        lo, hi = self._span(seg)
        return Checksum(hi - lo, self._prefix[hi] - self._prefix[lo])

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        return [self.checksum(part) for part in seg.split(points)]

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        lo, hi = self._span(seg)
        return None if lo == hi else (self._keys[lo], self._keys[hi - 1])

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        lo, hi = self._span(seg)
        step = max(1, math.ceil((hi - lo) / parts))
        return self._keys[lo + step : hi : step]


# ---------------------------------------------------------------------------------------------------------------
# The writer


def _operation(index: str, doc_id: str, version: int, doc: dict[str, Any]) -> bytes:
    """One bulk `index` operation, serialized on the preparing thread: the sending thread then only does I/O."""
    action = {"index": {"_index": index, "_id": doc_id, "version": version, "version_type": "external_gte"}}
    return orjson.dumps(action) + b"\n" + _json_bytes(doc) + b"\n"


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """orjson for speed; the standard library for what orjson refuses (jsonb integers beyond 64 bits)."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


BULK_FILTER = "errors,items.*.status,items.*.error.type,items.*.error.reason"
# A batch's bulk operations go in requests of at most this many bytes: Elasticsearch refuses a request larger than
# its http.max_content_length (100 MB by default) as a whole, which a batch of large documents would be.
BULK_REQUEST_BYTES = 32 * 1024 * 1024


def bulk_requests(operations: Sequence[bytes], most: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs `[start, end)` of `operations` of at most `most` bytes together; an operation larger than
    that on its own."""
    start, size = 0, 0
    for i, op in enumerate(operations):
        if i > start and size + len(op) > most:
            yield start, i
            start, size = i, 0
        size += len(op)
    if start < len(operations):
        yield start, len(operations)


# Bulk item errors that are about the document itself. Any other error (cluster_block_exception for a write
# block, index_closed_exception, index_not_found_exception, es_rejected_execution_exception,
# circuit_breaking_exception, unavailable shards, ...) concerns the index or the cluster and holds the batch.
ELASTICSEARCH_DOCUMENT_ERRORS = frozenset(
    {
        "mapper_parsing_exception",
        "document_parsing_exception",
        "strict_dynamic_mapping_exception",
        "illegal_argument_exception",
        "x_content_parse_exception",
        "json_parse_exception",
    }
)


def elasticsearch_fault(status: int, error_type: str | None) -> str:
    """A version conflict is "stale", an error about that document "document", anything else "store"."""
    if status == 409:
        return "stale"
    if status < 500 and error_type in ELASTICSEARCH_DOCUMENT_ERRORS:
        return "document"
    return "store"


class ElasticsearchWriter:
    enriched_rows = True
    takes_columns = False  # a document is more than its row: built one by one (`changed_documents`)

    def __init__(
        self,
        es: Elasticsearch,
        *,
        index_names: Mapping[str, str] | None = None,
        request_bytes: int = BULK_REQUEST_BYTES,
    ):
        """`index_names` maps an alias to another index to write to (a rebuild or a benchmark); `request_bytes` is
        the most a bulk request carries (`BULK_REQUEST_BYTES`)."""
        self.es = es
        self.index_names = dict(index_names or {})
        self.request_bytes = request_bytes

    def write(self, items: Sequence[WriteItem], *, indexed_at: datetime | None = None) -> WriteOutcome:
        return self.send(self.prepare(items, indexed_at=indexed_at))

    def truncate(self, table: SyncedTable, version: int) -> int:
        """Every live document of the table's index older than `version` becomes a tombstone at `version`."""
        assert table.elasticsearch_index is not None
        index = self.index_names.get(table.elasticsearch_index, table.elasticsearch_index)
        fields = [table.column(k).target_name for k in table.key]
        query = {
            "bool": {
                "filter": [{"range": {ES_VERSION_FIELD: {"lt": version}}}],
                "must_not": [{"term": {ES_DELETED_FIELD: True}}],
            }
        }
        try:
            # The batch written just before must be visible to the scan.
            self.es.indices.refresh(index=index)
            hits = list(es_helpers.scan(self.es, index=index, query={"query": query}, _source=fields, size=5000))
        except (ApiError, elastic_transport.TransportError) as exc:
            raise StoreRefusedError(f"Elasticsearch could not list {index} for a truncate: {exc}") from exc
        items = [
            WriteItem(table, dict(zip(table.key, (h["_source"][f] for f in fields), strict=True)), version, True)
            for h in hits
        ]
        return tombstones_written(self.write(items), index)

    def prepare(self, items: Sequence[WriteItem], *, indexed_at: datetime | None = None) -> Prepared:
        """Transform (CPU only, no I/O): can run on another thread while the previous batch is sent."""
        out = WriteOutcome()
        now = indexed_at or datetime.now(UTC)
        operations: list[bytes] = []
        planned: list[WriteItem] = []
        for item in items:
            index = item.table.elasticsearch_index
            if index is None:
                continue
            index = self.index_names.get(index, index)
            try:
                doc = to_es_document(
                    item.table,
                    item.row,
                    version=item.version,
                    deleted=item.deleted,
                    indexed_at=now,
                    enrichment=item.enrichment,
                )
                if not item.deleted:
                    # What was written, hashed: a fast checksum of the index needs no document to travel.
                    doc.update(es_hash_fields(item.table, doc))
                key = tuple(item.row[k] for k in item.table.key)
                doc_id = document_id(item.table, key)
            except (ValueError, TypeError, KeyError) as exc:
                out.poison.append((item, exc))
                continue
            operations.append(_operation(index, doc_id, item.version, doc))
            planned.append(item)
        return Prepared(out, (operations, planned))

    def prepare_documents(
        self, table: SyncedTable, documents: Sequence[dict[str, Any]], *, version: int, indexed_at: datetime
    ) -> Prepared:
        """Live documents of `table` whose column and derived fields are already spelled as `to_es_document` spells
        them (by PostgreSQL, see `postgres.document_rows_copy_sql`): the metadata and the hash are added here, as
        `prepare` adds them. CPU only, like `prepare`."""
        assert table.elasticsearch_index is not None
        index = self.index_names.get(table.elasticsearch_index, table.elasticsearch_index)
        [key] = table.key
        key_field = table.column(key).target_name
        metadata = {
            ES_VERSION_FIELD: version,
            ES_DELETED_FIELD: False,
            ES_INDEXED_AT_FIELD: format_timestamp(indexed_at),
        }
        operations: list[bytes] = []
        planned: list[WriteItem] = []
        for doc in documents:
            doc.update(metadata)
            doc.update(es_hash_fields(table, doc))
            doc_id = document_id(table, [doc[key_field]])
            operations.append(_operation(index, doc_id, version, doc))
            planned.append(WriteItem(table, {key: doc[key_field]}, version, False, (doc_id,)))
        return Prepared(WriteOutcome(), (operations, planned))

    def send(self, prepared: Prepared) -> WriteOutcome:
        out = prepared.outcome
        operations, planned = prepared.payload
        refused: dict[str, int] = defaultdict(int)
        for start, end in bulk_requests(operations, self.request_bytes):
            self._send_request(operations[start:end], planned[start:end], out, refused)
            if refused:
                break  # the batch is held: the rest would meet the same refusal
        if refused:
            causes = ", ".join(f"{n} x {cause}" for cause, n in sorted(refused.items()))
            raise StoreRefusedError(f"Elasticsearch refused document(s) store-wide ({causes}); holding the batch")
        return out

    def _send_request(
        self, operations: Sequence[bytes], planned: Sequence[WriteItem], out: WriteOutcome, refused: dict[str, int]
    ) -> None:
        try:
            # Only what is read back: parsing full per-item results cost as much as building the request.
            response = self.es.bulk(operations=b"".join(operations), refresh=False, filter_path=BULK_FILTER)
        except ApiError as exc:
            # The request as a whole was refused: whatever the status, no single document is to blame.
            raise StoreRefusedError(f"Elasticsearch refused the bulk request (HTTP {exc.meta.status})") from exc
        except elastic_transport.TransportError as exc:
            raise TransientStoreError(f"Elasticsearch unavailable: {type(exc).__name__}") from exc
        for item, result in zip(planned, response["items"], strict=True):
            r = result["index"]
            status = r.get("status", 500)
            if status < 300:
                out.written += 1
                continue
            error = r.get("error") or {}
            fault = elasticsearch_fault(status, error.get("type"))
            if fault == "stale":
                out.stale += 1
            elif fault == "document":
                out.poison.append((item, MappingRejectedError(f"{error.get('type')}: {error.get('reason')}")))
            else:
                refused[f"HTTP {status} {error.get('type') or 'error'}"] += 1


class MappingRejectedError(ValueError):
    """Elasticsearch refused a document for good (mapping or parsing error)."""


# ---------------------------------------------------------------------------------------------------------------
# The schema: index templates from `sql/elasticsearch/`, each index behind its alias; checked against the catalog


def templates() -> dict[str, Path]:
    """Index name (the alias searches use) -> its template file."""
    return {
        p.name.removesuffix(".template.json"): p for p in sorted((SQL_ROOT / "elasticsearch").glob("*.template.json"))
    }


def alias_body() -> dict[str, object]:
    """Searches through the alias never see soft-deleted documents (deletes are kept as versioned
    tombstones so that a stale write cannot resurrect them after Elasticsearch's gc_deletes window)."""
    return {"is_write_index": True, "filter": {"bool": {"must_not": {"term": {ES_DELETED_FIELD: True}}}}}


def apply_schema(es: Elasticsearch) -> Iterator[str]:
    for alias, path in templates().items():
        body = read_json("elasticsearch", path.name)
        es.indices.put_index_template(name=alias, **body)
        yield f"elasticsearch: index template {alias} ({path.name})"
        if es.indices.exists_alias(name=alias):
            # Converge existing indices: additive mapping changes and the alias definition.
            for index in es.indices.get_alias(name=alias):
                es.indices.put_mapping(index=index, properties=body["template"]["mappings"]["properties"])
                es.indices.put_alias(index=index, name=alias, **alias_body())
            continue
        if es.indices.exists(index=alias):
            raise RuntimeError(
                f"Elasticsearch has a concrete index named {alias!r} (probably auto-created by a write before the "
                f"schema was applied); searches expect an alias of that name over {alias}-v1. Reindex it into "
                f"{alias}-v1 and delete it, then apply again."
            )
        es.indices.create(index=f"{alias}-v1", aliases={alias: alias_body()})
        yield f"elasticsearch: created {alias}-v1 behind alias {alias}"


# Field types a mapping may give a catalog type (text keeps whatever analysis the index chose).
MAPPING_TYPES = {
    "int": {"integer", "long"},
    "bigint": {"long"},
    "bool": {"boolean"},
    "timestamptz": {"date", "date_nanos"},
    "numeric": {"double", "scaled_float", "keyword"},
}


def mapping_errors(table: SyncedTable, properties: Mapping[str, Any], where: str) -> list[str]:
    """What in a mapping's `properties` contradicts the catalog: a document field (column or derived field) it
    does not map, or maps with a type the writer's values do not fit. Used on the live index and the templates."""
    errors = []
    for f in plan(table, "document").fields:
        c = f.column
        mapped = properties.get(c.target_name)
        if mapped is None:
            errors.append(f"Elasticsearch: {where} maps no field {c.target_name} (for {c.name})")
        elif c.type in MAPPING_TYPES and mapped.get("type") not in MAPPING_TYPES[c.type]:
            errors.append(
                f"Elasticsearch: {where} maps {c.target_name} as {mapped.get('type')}, "
                f"expected {' or '.join(sorted(MAPPING_TYPES[c.type]))}"
            )
    return errors


def schema_errors(es: Elasticsearch, table: SyncedTable) -> list[str]:
    if table.elasticsearch_index is None:
        return []
    errors = []
    for index, body in es.indices.get_mapping(index=table.elasticsearch_index).items():
        errors += mapping_errors(table, body["mappings"].get("properties", {}), index)
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Housekeeping: tombstones past the purge horizon, and what the indices hold on disk


def _concrete(table: SyncedTable) -> str:
    """Every versioned index behind the table's alias (which hides tombstones)."""
    return f"{table.elasticsearch_index}-v*"


def purge_tombstones(es: Elasticsearch, table: SyncedTable, below_version: int) -> int:
    """Delete the tombstone documents versioned below `below_version`. Each delete is conditional on the document
    being the one read (its sequence number), so a document written again meanwhile, with a higher version, is
    not touched. (Scan and bulk rather than `_delete_by_query`, which lives in a module the core distribution
    does not ship.) Returns how many were deleted."""
    query = {
        "bool": {"filter": [{"term": {ES_DELETED_FIELD: True}}, {"range": {ES_VERSION_FIELD: {"lt": below_version}}}]}
    }
    hits = es_helpers.scan(
        es,
        index=_concrete(table),
        query={"query": query, "seq_no_primary_term": True},
        _source=False,
        size=5000,
        ignore_unavailable=True,
        allow_no_indices=True,
    )
    actions = (
        {
            "_op_type": "delete",
            "_index": h["_index"],
            "_id": h["_id"],
            "if_seq_no": h["_seq_no"],
            "if_primary_term": h["_primary_term"],
        }
        for h in hits
    )
    deleted = 0
    for ok, item in es_helpers.streaming_bulk(es, actions, chunk_size=5000, raise_on_error=False):
        status = item["delete"].get("status", 500)
        if ok:
            deleted += 1
        elif status not in (404, 409):  # gone already, or written again meanwhile: both fine
            raise StoreRefusedError(f"Elasticsearch refused a tombstone purge in {_concrete(table)}: {item}")
    es.indices.refresh(index=_concrete(table), ignore_unavailable=True, allow_no_indices=True)
    return deleted


def storage(es: Elasticsearch, table: SyncedTable) -> dict[str, int]:
    """What the indices behind the alias store: documents (tombstones included), tombstones, bytes."""
    rows = es.cat.indices(index=_concrete(table), format="json", bytes="b", expand_wildcards="open")
    tombstones = es.count(
        index=_concrete(table), query={"term": {ES_DELETED_FIELD: True}}, ignore_unavailable=True, allow_no_indices=True
    )["count"]
    return {
        "rows": sum(int(r.get("docs.count") or 0) for r in rows),
        "tombstones": int(tombstones),
        "bytes": sum(int(r.get("store.size") or 0) for r in rows),
    }


# ---------------------------------------------------------------------------------------------------------------
# The store


def newest_versions(es: Elasticsearch) -> dict[str, int]:
    """The highest version in each search index (0 when empty), tombstones included."""
    out: dict[str, int] = {}
    for t in TABLES:
        if t.elasticsearch_index is None:
            continue
        # The alias hides tombstones; a tombstone's version counts too, so the concrete indices are asked.
        response = es.search(
            index=f"{t.elasticsearch_index}-v*",
            size=0,
            aggs={"newest": {"max": {"field": ES_VERSION_FIELD}}},
            ignore_unavailable=True,
            allow_no_indices=True,
        )
        value = response["aggregations"]["newest"]["value"] if "aggregations" in response else None
        out[t.name] = int(value) if value is not None else 0
    return out


class ElasticsearchStore:
    """The search store: an index per table that declares one, documents with their derived fields."""

    name = "elasticsearch"
    title = "Elasticsearch"
    shape: Shape = "document"
    dlq_topic = "dlq-elasticsearch-failed"
    batch_size = 2_000  # changes a sink takes per batch: a bulk request of a few megabytes, at most 32 MiB each

    def holds(self, table: SyncedTable) -> bool:
        return table.elasticsearch_index is not None

    def location(self, table: SyncedTable) -> str:
        if table.elasticsearch_index is None:
            raise ValueError(f"{table.name} has no Elasticsearch index")
        return table.elasticsearch_index

    @contextmanager
    def connect(self, settings: Settings) -> Iterator[Elasticsearch]:
        # Long enough for an aggregation over a large index (a reconciliation's checksums).
        client = Elasticsearch(settings.es_url, request_timeout=120)
        try:
            yield client
        finally:
            client.close()

    def writer(self, client: Elasticsearch) -> ElasticsearchWriter:
        return ElasticsearchWriter(client)

    def side(
        self,
        client: Elasticsearch,
        table: SyncedTable,
        *,
        full: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Side:
        if full:
            return DocumentStreamSide(client, table, progress=progress)
        return StoredHashSide(client, table)

    def newest_versions(self, client: Elasticsearch) -> dict[str, int]:
        return newest_versions(client)

    def apply_schema(self, client: Elasticsearch) -> Iterator[str]:
        return apply_schema(client)

    def schema_errors(self, client: Elasticsearch, table: SyncedTable) -> list[str]:
        return schema_errors(client, table)

    def purge_tombstones(self, client: Elasticsearch, table: SyncedTable, below_version: int) -> int:
        return purge_tombstones(client, table, below_version)

    def storage(self, client: Elasticsearch, table: SyncedTable) -> dict[str, int]:
        return storage(client, table)

    def make_visible(self, client: Elasticsearch, table: SyncedTable) -> None:
        client.indices.refresh(index=self.location(table))


ELASTICSEARCH = ElasticsearchStore()
