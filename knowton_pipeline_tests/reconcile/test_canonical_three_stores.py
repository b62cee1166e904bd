"""Canonical rows agree across the real stores: nasty rows written to a scratch PostgreSQL table, a scratch copy of the
ClickHouse mirrors (through `to_clickhouse_row`) and a scratch Elasticsearch index under the real strict template
(through `to_es_document`) have the same canonical string, hash and segment checksums in PostgreSQL SQL, ClickHouse
SQL and Python. A search document's derived fields are computed by PostgreSQL from scratch copies of their source
tables, by the catalog's definition, and spelled alike from the enrichment and from `_source`.
"""

from __future__ import annotations

import itertools
import json
import random
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from knowton_pipeline.catalog import CDC_TABLES, Column, SyncedTable, table
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.canonical import (
    Shape,
    canonical_from_row,
    canonical_json_value,
    row_hash,
)
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.clickhouse import segment_checksum as clickhouse_segment_checksum
from knowton_pipeline.lib.stores.clickhouse import segment_rows_sql as clickhouse_segment_rows_sql
from knowton_pipeline.lib.stores.elasticsearch import (
    canonical_from_es_source,
    enrichment_from_es_source,
    es_segment_query,
    es_source_fields,
    row_from_es_source,
)
from knowton_pipeline.lib.stores.postgres import (
    DocumentRecords,
    MirrorRecords,
    document_rows_copy_sql,
    mirror_rows_copy_sql,
)
from knowton_pipeline.lib.stores.postgres import derived_sql as postgres_derived_sql
from knowton_pipeline.lib.stores.postgres import segment_checksum as postgres_segment_checksum
from knowton_pipeline.lib.stores.postgres import segment_rows_sql as postgres_segment_rows_sql
from knowton_pipeline.lib.transform import (
    ES_METADATA_FIELDS,
    clickhouse_columns,
    document_id,
    to_clickhouse_row,
    to_es_document,
)
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import key_of, key_of_source, python_segment_checksum, sources_checksum
from knowton_pipeline_tests.lib.test_debezium import NASTY_TEXT, column_values

INDEXED_AT = datetime(2026, 11, 24, 5, 5, 33, tzinfo=UTC)
# DateTime64 holds 1900-01-01 to 2299-12-31: a timestamp outside cannot be mirrored, whatever its canonical form.
MIRROR_TIMESTAMPS = st.one_of(
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2299, 12, 31, 23, 59, 59, 999_999), timezones=st.just(UTC)
    ),
    st.sampled_from(
        [
            datetime(1970, 1, 1, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
            datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            datetime(2026, 11, 24, 5, 5, 32, 100_000, tzinfo=UTC),
        ]
    ),
)
# Elasticsearch _ids are 1 to 512 bytes: text keys get a prefix, and stay short.
TEXT_KEYS = NASTY_TEXT.map(lambda s: "k" + s)
EXAMPLES = {"User": 60, "Content": 60, "Purchase": 30, "heartbeat": 15}
_versions = itertools.count(1)


def store_values(synced: SyncedTable, column: Column) -> st.SearchStrategy[Any]:
    if column.type == "timestamptz":
        return MIRROR_TIMESTAMPS
    if column.name in synced.key and column.type == "text":
        return TEXT_KEYS
    return column_values(column)


def batches(synced: SyncedTable) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Rows with distinct keys; the last one is deleted in the targets and never written to PostgreSQL."""
    row = st.fixed_dictionaries({c.name: store_values(synced, c) for c in synced.columns})
    return st.lists(row, min_size=2, max_size=7, unique_by=lambda r: key_of(synced, r))


# ---------------------------------------------------------------------------------------------------------------
# Scratch copies of the three stores, dropped at the end


@dataclass
class Scratch:
    pg: psycopg.Connection
    ch: ClickHouseClient
    es: Elasticsearch
    ch_database: str
    pg_tables: dict[str, sql.Identifier]
    es_indices: dict[str, str]
    ch_copy_database: str  # mirrors written by the backfill's column-wise way, from the PostgreSQL rows
    # Stand-ins for the tables derived fields are computed from (apart from pg_tables: their rows are drawn
    # to match the batch's rows).
    sources: dict[str, sql.Identifier] = field(default_factory=dict)
    es_ids: dict[str, set[str]] = field(default_factory=dict)  # written by the last example, per table

    def relation(self, synced: SyncedTable) -> sql.Identifier:
        return self.pg_tables[synced.name]


@pytest.fixture(scope="module")
def scratch(stack: Stack, settings: Settings) -> Iterator[Scratch]:
    run = uuid.uuid4().hex[:10]
    ch = clickhouse.get_client(settings.clickhouse_dsn)
    ch_database, ch_copy_database = f"canon_{run}", f"canon_copy_{run}"
    for database in (ch_database, ch_copy_database):
        clickhouse.run_script(ch, read_sql("clickhouse", "mirrors.sql").replace("knowton", database))
    es = Elasticsearch(settings.es_url, request_timeout=30)
    pg = psycopg.connect(**settings.pg_conninfo(), autocommit=True)  # type: ignore[arg-type]
    pg_tables: dict[str, sql.Identifier] = {}
    es_indices: dict[str, str] = {}
    sources: dict[str, sql.Identifier] = {}
    try:
        for name in sorted({s for t in CDC_TABLES for f in t.derived for s in f.sources}):
            source = table(name)
            sources[name] = sql.Identifier("ops", f"canon_src_{name.lower()}_{run}")
            pg.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                    sources[name], sql.Identifier(source.schema, source.name)
                )
            )
        for synced in CDC_TABLES:
            name = sql.Identifier("ops", f"canon_{synced.name.lower()}_{run}")
            # LIKE copies NOT NULL and defaults, not the checks, keys or foreign keys nasty rows would trip.
            pg.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                    name, sql.Identifier(synced.schema, synced.name)
                )
            )
            pg_tables[synced.name] = name
            if synced.elasticsearch_index:
                index = f"{synced.elasticsearch_index}-canon-{run}"
                es.indices.create(index=index)  # the real template's strict mapping applies
                es_indices[synced.name] = index
        yield Scratch(pg, ch, es, ch_database, pg_tables, es_indices, ch_copy_database, sources)
    finally:
        for name in [*pg_tables.values(), *sources.values()]:
            pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        for index in es_indices.values():
            es.indices.delete(index=index, ignore_unavailable=True)
        ch.command(f"DROP DATABASE IF EXISTS {ch_database}")
        ch.command(f"DROP DATABASE IF EXISTS {ch_copy_database}")
        pg.close()
        es.close()


def test_scratch_index_has_the_strict_search_mapping(scratch: Scratch) -> None:
    index = scratch.es_indices["Content"]
    mapping = scratch.es.indices.get_mapping(index=index)[index]["mappings"]
    assert mapping["dynamic"] == "strict" and mapping["properties"]["metadata"] == {"type": "object", "enabled": False}


# ---------------------------------------------------------------------------------------------------------------
# Writing a batch to all three, as the pipeline would


PURCHASE_STATUSES = ("pending", "completed", "refunded", "failed")


def write_derived_sources(
    scratch: Scratch, synced: SyncedTable, live: list[dict[str, Any]], data: st.DataObject
) -> dict[tuple, dict[str, Any]]:
    """Scratch source rows for the derived fields of a Content batch: some creators have a User row (with a nasty
    username), each content a few purchases in any status. Returns the enrichment the definitions must give."""
    if not synced.derived:
        return {key_of(synced, r): {} for r in live}
    assert [f.name for f in synced.derived] == ["creator_username", "sales_count"], "a new derived field: test it"
    users, purchases = scratch.sources["User"], scratch.sources["Purchase"]
    scratch.pg.execute(sql.SQL("TRUNCATE {}, {}").format(users, purchases))
    usernames = {
        creator: data.draw(NASTY_TEXT, label="username")
        for creator in sorted({r["creator"] for r in live})
        if data.draw(st.booleans(), label="has a User row")
    }
    statuses = {
        r["id"]: data.draw(st.lists(st.sampled_from(PURCHASE_STATUSES), max_size=4), label="purchases") for r in live
    }
    sold = [(content_id, status) for content_id, drawn in statuses.items() for status in drawn]
    with scratch.pg.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (address, username) VALUES (%s, %s)").format(users), list(usernames.items())
        )
        cur.executemany(
            sql.SQL(
                'INSERT INTO {} (id, "contentId", buyer, amount, currency, status) VALUES (%s, %s, %s, 1, %s, %s)'
            ).format(purchases),
            [(i, content_id, "0xbuyer", "ETH", status) for i, (content_id, status) in enumerate(sold)],
        )
    return {
        key_of(synced, r): {
            "creator_username": usernames.get(r["creator"]),
            "sales_count": statuses[r["id"]].count("completed"),
        }
        for r in live
    }


def postgres_enrichment(scratch: Scratch, synced: SyncedTable) -> dict[tuple, dict[str, Any]]:
    """The derived fields as PostgreSQL computes them by the catalog's definitions, over the scratch sources."""
    query = sql.SQL("SELECT {keys}, {derived} FROM {rel} AS t").format(
        keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in synced.key),
        derived=sql.SQL(", ").join(postgres_derived_sql(f, "t", sources=scratch.sources) for f in synced.derived),
        rel=scratch.relation(synced),
    )
    n = len(synced.key)
    names = [f.name for f in synced.derived]
    return {tuple(r[:n]): dict(zip(names, r[n:], strict=True)) for r in scratch.pg.execute(query).fetchall()}


def write_everywhere(
    scratch: Scratch,
    synced: SyncedTable,
    live: list[dict[str, Any]],
    gone: dict[str, Any],
    enrichment: dict[tuple, dict[str, Any]] | None = None,
) -> None:
    """`live` rows go to every store. `gone` was synced and then deleted: the mirror holds its old version and its
    delete, the index its tombstone. The first live row also has an older, different version in the mirror. Search
    documents carry `enrichment`, by key."""
    relation = scratch.relation(synced)
    pg = scratch.pg
    pg.execute(sql.SQL("TRUNCATE {}").format(relation))
    names = [c.name for c in synced.columns]
    jsonb = {c.name for c in synced.columns if c.type == "jsonb"}
    with pg.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                relation,
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.SQL(", ").join(sql.Placeholder() * len(names)),
            ),
            [[Jsonb(r[n]) if n in jsonb else r[n] for n in names] for r in live],
        )

    base = next(_versions) * 10
    mirror = f"{scratch.ch_database}.{synced.clickhouse_table}"
    scratch.ch.command(f"TRUNCATE TABLE {mirror}")
    older = {**gone, **{k: live[0][k] for k in synced.key}}
    rows = [
        to_clickhouse_row(synced, older, version=base + 1, deleted=False),
        to_clickhouse_row(synced, gone, version=base + 1, deleted=False),
        *(to_clickhouse_row(synced, r, version=base + 2, deleted=False) for r in live),
        to_clickhouse_row(synced, {k: gone[k] for k in synced.key}, version=base + 3, deleted=True),
    ]
    scratch.ch.insert(mirror, rows, column_names=clickhouse_columns(synced))

    index = scratch.es_indices.get(synced.name)
    if index is None:
        return
    # The previous example's documents go first (this Elasticsearch build has no _delete_by_query).
    operations: list[dict[str, Any]] = [
        {"delete": {"_index": index, "_id": doc_id, "version": base, "version_type": "external_gte"}}
        for doc_id in scratch.es_ids.pop(synced.name, ())
    ]
    scratch.es_ids[synced.name] = {document_id(synced, key_of(synced, r)) for r in [*live, gone]}
    for row, version, deleted in [
        (gone, base + 1, False),
        *((r, base + 2, False) for r in live),
        (gone, base + 3, True),
    ]:
        doc_id = document_id(synced, key_of(synced, row))
        operations.append(
            {"index": {"_index": index, "_id": doc_id, "version": version, "version_type": "external_gte"}}
        )
        extra = (enrichment or {}).get(key_of(synced, row))
        operations.append(
            to_es_document(synced, row, version=version, deleted=deleted, indexed_at=INDEXED_AT, enrichment=extra)
        )
    # Sent with the client's json serializer: ElasticsearchWriter's orjson refuses jsonb integers beyond 64 bits.
    response = scratch.es.bulk(operations=operations, refresh=True)
    assert not response["errors"], [i for i in response["items"] if next(iter(i.values())).get("error")]


# ---------------------------------------------------------------------------------------------------------------
# Reading canonical rows back from each


def postgres_rows(scratch: Scratch, synced: SyncedTable, shape: Shape = "mirror") -> dict[tuple, tuple[str, int]]:
    query = postgres_segment_rows_sql(
        synced,
        relation=scratch.relation(synced),
        shape=shape,
        sources=scratch.sources,
        lower_bound=False,
        upper_bound=False,
    )
    n = len(synced.key)
    return {tuple(r[:n]): (r[n], r[n + 1]) for r in scratch.pg.execute(query).fetchall()}


def postgres_python_rows(scratch: Scratch, synced: SyncedTable) -> list[dict[str, Any]]:
    """The rows as the backfill reads them: psycopg's types, jsonb through json.loads."""
    with scratch.pg.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(scratch.relation(synced)))
        return cur.fetchall()


def clickhouse_rows(scratch: Scratch, synced: SyncedTable, database: str | None = None) -> dict[tuple, tuple[str, int]]:
    query = clickhouse_segment_rows_sql(
        synced, database=database or scratch.ch_database, lower_bound=False, upper_bound=False
    )
    n = len(synced.key)
    return {tuple(r[:n]): (r[n], r[n + 1]) for r in scratch.ch.query(query).result_rows}


def copy_into_mirror(scratch: Scratch, synced: SyncedTable) -> dict[tuple, tuple[str, int]]:
    """The PostgreSQL rows written to a mirror the backfill's column-wise way (PostgreSQL spells each row as the
    mirror's JSON in a COPY, ClickHouse parses them), read back as canonical rows and hashes."""
    scratch.ch.command(f"TRUNCATE TABLE {scratch.ch_copy_database}.{synced.clickhouse_table}")
    copy_sql = mirror_rows_copy_sql(synced, sql.SQL("true"), 7, relation=scratch.relation(synced))
    records = MirrorRecords(synced)
    with scratch.pg.cursor() as cur, cur.copy(copy_sql) as copy:
        block = b"".join(records.line(bytes(record)) for record in copy)
    writer = ClickHouseWriter(scratch.ch, database=scratch.ch_copy_database)
    assert writer.insert_json_rows(synced, records.columns, block)
    return clickhouse_rows(scratch, synced, scratch.ch_copy_database)


def es_sources(scratch: Scratch, synced: SyncedTable, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    response = scratch.es.search(
        index=scratch.es_indices[synced.name],
        query=query or {"match_all": {}},
        size=100,
        source_includes=es_source_fields(synced),
    )
    return [hit["_source"] for hit in response["hits"]["hits"]]


def assert_same(expected: dict[tuple, str], **stores: dict[tuple, str]) -> None:
    for store, got in stores.items():
        assert got.keys() == expected.keys(), f"{store}: keys differ"
        differ = {k: (expected[k], got[k]) for k in expected if got[k] != expected[k]}
        assert not differ, f"{store} differs from Python (expected, got): {differ}"


def read_plainly(value: Any) -> bool:
    """Whether orjson reads this JSON value (as psycopg's json.loads gave it) to the very same value: no float outside
    1e-4..1e16 (but zero) and no integer beyond 64 bits."""
    if isinstance(value, dict):
        return all(read_plainly(v) for v in value.values())
    if isinstance(value, list):
        return all(read_plainly(v) for v in value)
    if type(value) is float:
        return value == 0 or 1e-4 <= abs(value) < 1e16
    if type(value) is int:
        return -(2**63) <= value < 2**64
    return True


def check_spelled_documents(scratch: Scratch, synced: SyncedTable, enrichment: dict[tuple, dict[str, Any]]) -> None:
    """A search backfill's documents as PostgreSQL spells them (`document_rows_copy_sql`) are the very documents the
    row transform makes of the rows psycopg reads; a row left to the transform is one it refuses, or one whose jsonb
    orjson might read otherwise."""
    copy_sql = document_rows_copy_sql(
        synced, sql.SQL("true"), relation=scratch.relation(synced), sources=scratch.sources
    )
    with scratch.pg.cursor() as cur, cur.copy(copy_sql) as copy:
        records = [bytes(r) for r in copy]
    rows = {key_of(synced, r): r for r in postgres_python_rows(scratch, synced)}
    reader = DocumentRecords(synced)
    jsonb = [c.name for c in synced.columns if c.in_elasticsearch and c.type == "jsonb"]
    assert len(records) == len(rows)
    for record in records:
        key = (reader.key(record),)
        row = rows[key]
        try:
            expected: dict[str, Any] | None = to_es_document(
                synced, row, version=7, deleted=False, indexed_at=INDEXED_AT, enrichment=enrichment[key] or None
            )
        except (ValueError, TypeError):
            expected = None
        try:
            fields = reader.fields(record)
        except ValueError:
            assert expected is None or not all(read_plainly(row[name]) for name in jsonb), key
            continue
        assert expected is not None, key
        assert fields == {k: v for k, v in expected.items() if k not in ES_METADATA_FIELDS}, key


def check_batch(scratch: Scratch, synced: SyncedTable, batch: list[dict[str, Any]], data: st.DataObject) -> None:
    live, gone = batch[:-1], batch[-1]
    enrichment = write_derived_sources(scratch, synced, live, data)
    write_everywhere(scratch, synced, live, gone, enrichment)

    python = {key_of(synced, r): canonical_from_row(synced, r) for r in live}
    pg = postgres_rows(scratch, synced)
    ch = clickhouse_rows(scratch, synced)
    read_back = {key_of(synced, r): canonical_from_row(synced, r) for r in postgres_python_rows(scratch, synced)}
    assert_same(
        python,
        postgres_sql={k: v[0] for k, v in pg.items()},
        clickhouse_sql={k: v[0] for k, v in ch.items()},
        python_over_postgres_rows=read_back,
    )
    hashes = {k: row_hash(v) for k, v in python.items()}
    assert {k: v[1] for k, v in pg.items()} == hashes
    assert {k: v[1] for k, v in ch.items()} == hashes
    # A backfill writes the mirror column-wise: the very rows the row-by-row transform writes.
    copied = copy_into_mirror(scratch, synced)
    assert_same({k: v[0] for k, v in ch.items()}, clickhouse_copied={k: v[0] for k, v in copied.items()})
    assert {k: v[1] for k, v in copied.items()} == hashes
    # ...and its jsonb text byte for byte: what the row transform makes of the row as PostgreSQL gives it back.
    jsonb = [c for c in synced.columns if c.type == "jsonb"]
    if jsonb:
        key_name = synced.column(synced.key[0]).target_name
        names = ", ".join(c.target_name for c in jsonb)
        query = f"SELECT {key_name}, {names} FROM {scratch.ch_copy_database}.{synced.clickhouse_table}"
        stored = {r[0]: list(r[1:]) for r in scratch.ch.query(query).result_rows}
        positions = [clickhouse_columns(synced).index(c.target_name) for c in jsonb]
        transformed = {}
        for r in postgres_python_rows(scratch, synced):
            mirror_row = to_clickhouse_row(synced, r, version=7, deleted=False)
            transformed[r[synced.key[0]]] = [mirror_row[p] for p in positions]
        assert stored == transformed

    # The search document's canonical rows: its columns and derived fields, as enriched rows hold them.
    enriched = [{**r, **enrichment[key_of(synced, r)]} for r in live]
    if synced.name in scratch.es_indices:
        if synced.derived:
            assert postgres_enrichment(scratch, synced) == enrichment
        sources = es_sources(scratch, synced, es_segment_query(synced))
        es_python = {key_of(synced, r): canonical_from_row(synced, r, shape="document") for r in enriched}
        assert_same(
            es_python,
            elasticsearch_source={key_of_source(synced, s): canonical_from_es_source(synced, s) for s in sources},
            elasticsearch_row={
                key_of_source(synced, s): canonical_from_row(
                    synced,
                    row_from_es_source(synced, s),
                    shape="document",
                    enrichment=enrichment_from_es_source(synced, s),
                )
                for s in sources
            },
            postgres_sql_for_search={k: v[0] for k, v in postgres_rows(scratch, synced, "document").items()},
        )

    if synced.name in scratch.es_indices:
        check_spelled_documents(scratch, synced, enrichment)

    # Segment checksums: [lo, hi) between two of the batch's keys, half-open and unbounded ones.
    keys = sorted(k[0] for k in python)
    lo = data.draw(st.sampled_from(keys), label="lo")
    hi = data.draw(st.sampled_from([k for k in keys if k >= lo] + [None]), label="hi")
    for bounds in [(lo, hi), (None, hi), (lo, None), (None, None)]:
        a, b = bounds
        in_segment = [
            r for r in live if (a is None or key_of(synced, r)[0] >= a) and (b is None or key_of(synced, r)[0] < b)
        ]
        expected = python_segment_checksum(synced, in_segment)
        assert postgres_segment_checksum(scratch.pg, synced, a, b, relation=scratch.relation(synced)) == expected, (
            bounds
        )
        assert clickhouse_segment_checksum(scratch.ch, synced, a, b, database=scratch.ch_database) == expected, bounds
        if synced.name in scratch.es_indices:
            keys_in = {key_of(synced, r) for r in in_segment}
            expected_es = python_segment_checksum(
                synced, [r for r in enriched if key_of(synced, r) in keys_in], shape="document"
            )
            searched = es_sources(scratch, synced, es_segment_query(synced, a, b))
            assert sources_checksum(synced, searched) == expected_es, bounds
            assert (
                postgres_segment_checksum(
                    scratch.pg,
                    synced,
                    a,
                    b,
                    relation=scratch.relation(synced),
                    shape="document",
                    sources=scratch.sources,
                )
                == expected_es
            ), bounds
    if synced.name in scratch.es_indices:
        # Tombstones come back without the query's filter too; the checksum itself skips them.
        everything = es_sources(scratch, synced)
        assert len(everything) == len(live) + 1
        assert sources_checksum(synced, everything) == python_segment_checksum(synced, enriched, shape="document")


@pytest.mark.parametrize("synced", CDC_TABLES, ids=lambda t: t.name)
def test_nasty_rows_have_equal_canonical_rows_hashes_and_checksums_in_all_three_stores(
    scratch: Scratch, synced: SyncedTable
) -> None:
    @settings(
        max_examples=EXAMPLES[synced.name],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(batch=batches(synced), data=st.data())
    def run(batch: list[dict[str, Any]], data: st.DataObject) -> None:
        check_batch(scratch, synced, batch, data)

    run()


# ---------------------------------------------------------------------------------------------------------------
# Hand-picked regressions


def user(address: str, **values: Any) -> dict[str, Any]:
    return {
        "address": address,
        "username": "u",
        "email": None,
        "bio": None,
        "avatarUrl": None,
        "reputation": 0,
        "isVerified": False,
        "createdAt": datetime(1970, 1, 1, tzinfo=UTC),
        "updatedAt": datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        **values,
    }


def content(content_id: int, **values: Any) -> dict[str, Any]:
    return {
        "id": content_id,
        "creator": "0xa",
        "title": "t",
        "description": None,
        "category": "art",
        "tags": [],
        "price": Decimal("0.00"),
        "status": "published",
        "metadata": {},
        "createdAt": datetime(1970, 1, 1, tzinfo=UTC),
        "updatedAt": datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        **values,
    }


REGRESSION_ROWS: dict[str, list[dict[str, Any]]] = {
    "User": [
        user("0x1", bio=""),
        user("0x2", bio=None),
        user("0x3", bio="\\N", email="", avatarUrl="\t"),
        user("0x4", bio="🚀 to the moon 🌙 \u2028 é", username="\\", isVerified=True, reputation=-(2**31)),
        user("0x5", reputation=2**31 - 1, createdAt=datetime(2000, 2, 29, 12, 0, 0, 500_000, tzinfo=UTC)),
        user("0x6 gone"),
    ],
    "Content": [
        content(2**63 - 1, price=Decimal("9999999999.99"), metadata={"b": 1, "a": {"d": [1, 2.5, "x"], "c": None}}),
        content(-(2**63), price=Decimal("-0.00"), metadata={"é": {"日本": [1.0, -0.0, 1e16]}, "e": "\u0001\u001f"}),
        content(0, price=Decimal("0.00"), tags=["a,b"], metadata=None),
        content(1, price=Decimal("5.1"), tags=["a", "b"], metadata=[0.1, 1e-7, 1.7976931348623157e308, 5e-324]),
        content(2, tags=[""], metadata={"big": 2**70, "neg": -(2**70), "s": 'q"\\'}, description=""),
        content(3, tags=[], metadata="just a string", description="\\N"),
        content(4),
    ],
}


@pytest.mark.parametrize("name", sorted(REGRESSION_ROWS))
def test_hand_picked_rows_agree_in_all_three_stores(scratch: Scratch, name: str) -> None:
    synced = table(name)
    batch = REGRESSION_ROWS[name]

    @settings(max_examples=3, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        check_batch(scratch, synced, batch, data)

    run()
    pg = postgres_rows(scratch, synced)
    if name == "Content":
        assert pg[(2**63 - 1,)][0].split("\t")[8] == '{"a":{"c":null,"d":[1,2.5,"x"]},"b":1}'
        assert pg[(2**63 - 1,)][0].split("\t")[6] == "9999999999.99"
        negative = pg[(-(2**63),)][0].split("\t")
        assert (negative[6], negative[8]) == ("0.00", '{"e":"\\u0001\\u001f","é":{"日本":[1,0,10000000000000000]}}')
        assert pg[(0,)][0].split("\t")[5] != pg[(1,)][0].split("\t")[5]  # ['a,b'] is not ['a', 'b']
    else:
        bios = {k[0]: v[0].split("\t")[3] for k, v in pg.items()}
        assert (bios["0x1"], bios["0x2"], bios["0x3"]) == ("", "\\N", "\\\\N")
        assert pg[("0x1",)][0].split("\t")[7:] == ["1970-01-01T00:00:00.000000Z", "2099-12-31T23:59:59.999999Z"]


# ---------------------------------------------------------------------------------------------------------------
# JSON numbers: PostgreSQL and ClickHouse spell them as Python does


def random_doubles(count: int, seed: int) -> list[float]:
    """Doubles from random bit patterns (every exponent, subnormals included) and decimal-looking ones."""
    rng = random.Random(seed)
    values: list[float] = []
    while len(values) < count:
        (value,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if value == value and abs(value) != float("inf"):
            values.append(value)
        values.append(round(rng.uniform(-1e6, 1e6), rng.randint(0, 8)))
    return values


EDGE_NUMBERS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.1,
    0.5,
    1e-4,
    1e-5,
    1.5e-7,
    1e15,
    1e16,
    1e17,
    1e21,
    1e22,
    1e23,
    2.0**53,
    2.0**53 + 2,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    2.2250738585072014e-308,
    123456789.125,
    2**70,
    -(2**63),
]


def test_clickhouse_rewrites_the_mirrors_json_floats_as_python_spells_them(scratch: Scratch) -> None:
    synced = table("Content")
    numbers = EDGE_NUMBERS + random_doubles(3000, seed=20261124)
    rows = [content(i, metadata=numbers[i * 500 : (i + 1) * 500]) for i in range(len(numbers) // 500 + 1)]
    mirror = f"{scratch.ch_database}.{synced.clickhouse_table}"
    scratch.ch.command(f"TRUNCATE TABLE {mirror}")
    scratch.ch.insert(
        mirror,
        [to_clickhouse_row(synced, r, version=1, deleted=False) for r in rows],
        column_names=clickhouse_columns(synced),
    )
    got = clickhouse_rows(scratch, synced)
    for row in rows:
        assert got[(row["id"],)][0] == canonical_from_row(synced, row)


def test_postgres_spells_jsonb_numbers_as_python_reads_them(scratch: Scratch) -> None:
    # However a number was written to jsonb, Python reads it back from jsonb's text (json.loads, via psycopg or the
    # Debezium decoder): PostgreSQL's spelling must be Python's spelling of that value.
    texts = [json.dumps(x) for x in EDGE_NUMBERS + random_doubles(2000, seed=7)] + [
        "1.50",
        "1E+2",
        "-0.0",
        "0.12345678901234567890",
        "1e-400",
        "1" + "0" * 400 + ".5",
        "12345678901234567890123.0",
        "1.2345678901234567890123E+30",
        "-1e-7",
        "100.000",
    ]
    rows = scratch.pg.execute(
        "SELECT ops.canonical_jsonb(t::jsonb), t::jsonb FROM unnest(%s::text[]) AS t", (texts,)
    ).fetchall()
    for text, (spelled, value) in zip(texts, rows, strict=True):
        if value == float("inf") or value == float("-inf"):
            assert spelled in ("Infinity", "-Infinity"), text  # not JSON to Python: refused by the decoder
            continue
        assert spelled == canonical_json_value(value), text


def test_both_copies_leave_a_text_array_the_transform_refuses_to_it_without_failing(scratch: Scratch) -> None:
    """A tags array holding NULL, or nested: PostgreSQL holds it, the transform refuses it (a text[] of strings). Each
    COPY marks its row for the row-by-row way (which reports it) and spells the others; neither COPY fails."""
    synced = table("Content")
    relation = scratch.relation(synced)
    scratch.pg.execute(sql.SQL("TRUNCATE {}").format(relation))
    for row in [content(1, tags=["a"]), content(2), content(3)]:
        names = list(row)
        scratch.pg.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                relation,
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.SQL(", ").join(sql.Placeholder() * len(names)),
            ),
            [Jsonb(row[n]) if n == "metadata" else row[n] for n in names],
        )
    scratch.pg.execute(sql.SQL("UPDATE {} SET tags = '{{{{a,b}},{{c,d}}}}' WHERE id = 2").format(relation))
    scratch.pg.execute(sql.SQL("UPDATE {} SET tags = ARRAY['a', NULL] WHERE id = 3").format(relation))

    documents = DocumentRecords(synced)
    copy_sql = document_rows_copy_sql(synced, sql.SQL("true"), relation=relation, sources=scratch.sources)
    with scratch.pg.cursor() as cur, cur.copy(copy_sql) as copy:
        records = {documents.key(bytes(r)): bytes(r) for r in copy}
    assert documents.fields(records[1])["tags"] == ["a"]
    for key in (2, 3):
        with pytest.raises(ValueError, match="left to the row-by-row transform"):
            documents.fields(records[key])

    mirror = MirrorRecords(synced)
    with (
        scratch.pg.cursor() as cur,
        cur.copy(mirror_rows_copy_sql(synced, sql.SQL("true"), 7, relation=relation)) as copy,
    ):
        lines = {mirror.key(bytes(r)): mirror.line(bytes(r)) for r in copy}
    assert sorted(lines) == [1, 2, 3]
    writer = ClickHouseWriter(scratch.ch, database=scratch.ch_copy_database)
    for key in (2, 3):  # spelled so that ClickHouse refuses the row: it then goes the row-by-row way
        assert not writer.insert_json_rows(synced, mirror.columns, lines[key])
    for row in postgres_python_rows(scratch, synced):
        if row["id"] in (2, 3):
            with pytest.raises(ValueError, match="tags"):
                to_clickhouse_row(synced, row, version=7, deleted=False)
