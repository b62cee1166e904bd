"""The one transform per target (`knowton_pipeline.lib.transform`), checked without a store: ClickHouse rows match
the mirror DDL and keep decimals exact, Elasticsearch documents match the strict index mappings.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.catalog import CDC_TABLES, TABLES, Column, SyncedTable, table
from knowton_pipeline.lib.debezium import decode_event
from knowton_pipeline.lib.settings import PROJECT_ROOT
from knowton_pipeline.lib.stores.elasticsearch import es_hash_fields
from knowton_pipeline.lib.transform import (
    EPOCH,
    canonical_json,
    canonical_json_text,
    clickhouse_columns,
    document_id,
    to_clickhouse_row,
    to_es_document,
)
from knowton_pipeline_tests.lib.test_debezium import (
    FIXED_ROWS,
    NASTY_TEXT,
    REAL_KEY,
    REAL_VALUE,
    json_values,
    rows,
    tables_and_rows,
)

SQL = PROJECT_ROOT / "sql"
INDEXED_TABLES = [t for t in TABLES if t.elasticsearch_index]
INDEXED_AT = datetime(2026, 11, 24, 5, 5, 33, 120_000, tzinfo=UTC)


def mirror_ddl() -> dict[str, list[tuple[str, str]]]:
    """(column, ClickHouse type) per mirror table, read from sql/clickhouse/mirrors.sql."""
    text = (SQL / "clickhouse" / "mirrors.sql").read_text()
    tables = {}
    for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS knowton\.(\w+)\s*\((.*?)\n\)\s*ENGINE", text, re.S):
        lines = [line.strip().rstrip(",") for line in body.splitlines()]
        tables[name] = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("--")]
    return tables


def es_mapping(synced: SyncedTable) -> dict[str, Any]:
    path = SQL / "elasticsearch" / f"{synced.elasticsearch_index}.template.json"
    return json.loads(path.read_text())["template"]["mappings"]["properties"]


def reorder(value: Any) -> Any:
    """The same JSON value with every object's keys inserted in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# ClickHouse


@pytest.mark.parametrize("synced", CDC_TABLES, ids=lambda t: t.name)
def test_clickhouse_columns_and_nullability_match_the_mirror_ddl(synced: SyncedTable) -> None:
    ddl = mirror_ddl()[synced.clickhouse_table]
    assert clickhouse_columns(synced) == [name for name, _ in ddl]
    assert clickhouse_columns(synced)[-2:] == ["version", "is_deleted"]
    for column in synced.columns:
        ch_type = dict(ddl)[column.target_name]
        assert ch_type.startswith("Nullable(") == column.nullable, column.name
        if column.type == "numeric":
            assert ch_type.endswith(f", {column.scale})"), column.name


@given(tables_and_rows(), st.integers(0, 2**64 - 1))
def test_clickhouse_row_follows_the_column_order_and_keeps_exact_types(
    table_and_row: tuple[SyncedTable, dict], version: int
) -> None:
    synced, row = table_and_row
    values = to_clickhouse_row(synced, row, version=version, deleted=False)
    assert len(values) == len(clickhouse_columns(synced))
    by_name = dict(zip(clickhouse_columns(synced), values, strict=True))
    assert (by_name["version"], by_name["is_deleted"]) == (version, 0)
    for column in synced.columns:
        value, original = by_name[column.target_name], row[column.name]
        if original is None and column.nullable:
            assert value is None
        elif column.type == "numeric":
            assert type(value) is Decimal and value == original
            assert value.as_tuple().exponent == -(column.scale or 0)
            assert not (value.is_zero() and value.is_signed()), "PostgreSQL numeric has no negative zero"
        elif column.type == "timestamptz":
            assert value == original and value.tzinfo is UTC
        elif column.type == "jsonb":
            assert value == canonical_json(original) and json.loads(value) == original
        else:
            assert value == original and type(value) is type(original)


@given(json_values(NASTY_TEXT))
def test_jsonb_canonical_text_does_not_depend_on_key_order(value: Any) -> None:
    content = table("Content")
    row = {**FIXED_ROWS["Content"], "metadata": value}
    reordered = {**row, "metadata": reorder(value)}
    position = clickhouse_columns(content).index("metadata")
    text = to_clickhouse_row(content, row, version=1, deleted=False)[position]
    assert text == to_clickhouse_row(content, reordered, version=1, deleted=False)[position]
    assert json.loads(text) == value


def test_jsonb_canonical_text_sorts_keys_and_keeps_unicode() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": "é🚀"}], "a": 1.5}) == '{"a":1.5,"b":[1,{"c":"é🚀","d":null}]}'
    # 'null'::jsonb in a NOT NULL column is a value, not a NULL.
    content = table("Content")
    row = to_clickhouse_row(content, {**FIXED_ROWS["Content"], "metadata": None}, version=1, deleted=False)
    assert row[clickhouse_columns(content).index("metadata")] == "null"


def jsonb_spelling(value: Any, reverse: bool) -> str:
    """JSON text as jsonb prints it: `", "` and `": "` between members, keys in an order not their sorted one."""
    if isinstance(value, dict):
        members = sorted(value.items(), reverse=reverse)
        return (
            "{"
            + ", ".join(json.dumps(k, ensure_ascii=False) + ": " + jsonb_spelling(v, reverse) for k, v in members)
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_spelling(v, reverse) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


# Floats of every magnitude, spelled in any way JSON allows (PostgreSQL keeps a jsonb number's digits as written).
FLOAT_TEXTS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: orjson.dumps(f).decode()),
    st.builds(
        lambda digits, point, exponent: (
            f"{digits[:point] or '0'}.{digits[point:] or '0'}e{exponent}".lstrip("0")
            if digits[:point].lstrip("0")
            else f"0.{digits[point:] or '0'}e{exponent}"
        ),
        st.text("0123456789", min_size=1, max_size=40),
        st.integers(0, 40),
        st.integers(-340, 320),
    ),
)


@given(json_values(NASTY_TEXT), st.booleans())
def test_jsonb_text_is_read_and_written_as_canonical_json_does(value: Any, reverse: bool) -> None:
    # The backfill's fast spelling of jsonb text, against the transform's own: byte for byte, floats of any
    # magnitude and integers beyond 64 bits included.
    text = jsonb_spelling(value, reverse).encode()
    assert canonical_json_text(text) == canonical_json(json.loads(text))


@given(st.lists(FLOAT_TEXTS, min_size=1, max_size=5), st.integers(-(2**80), 2**80))
def test_jsonb_numbers_however_spelled_are_read_as_json_reads_them(numbers: list[str], integer: int) -> None:
    text = ("[" + ", ".join([*numbers, str(integer)]) + "]").encode()
    try:
        expected = canonical_json(json.loads(text))
    except ValueError:  # beyond a double: json reads an infinity, which the transform refuses
        with pytest.raises(ValueError):
            canonical_json_text(text)
        return
    assert canonical_json_text(text) == expected


def test_what_the_transform_refuses_in_jsonb_text_is_refused() -> None:
    for text in (b'{"a": 1e400}', b"[-1e999]", b"NaN", b'{"a": Infinity}', b"{", b""):
        with pytest.raises(ValueError):
            canonical_json_text(text)


def test_negative_zero_and_missing_trailing_zeros_become_postgres_decimals() -> None:
    content = table("Content")
    position = clickhouse_columns(content).index("price")
    for given_price, expected in [("-0.00", "0.00"), ("5", "5.00"), ("5.1", "5.10"), ("5.10000", "5.10")]:
        row = {**FIXED_ROWS["Content"], "price": Decimal(given_price)}
        assert str(to_clickhouse_row(content, row, version=1, deleted=False)[position]) == expected


@pytest.mark.parametrize("synced", CDC_TABLES, ids=lambda t: t.name)
def test_a_delete_with_only_key_columns_is_filled_with_neutral_values(synced: SyncedTable) -> None:
    key_only = {k: FIXED_ROWS[synced.name][k] for k in synced.key}
    values = to_clickhouse_row(synced, key_only, version=99, deleted=True)
    by_name = dict(zip(clickhouse_columns(synced), values, strict=True))
    neutral = {
        "text": "",
        "int": 0,
        "bigint": 0,
        "bool": False,
        "timestamptz": EPOCH,
        "text[]": [],
        "jsonb": "{}",
    }
    for column in synced.columns:
        value = by_name[column.target_name]
        if column.name in synced.key:
            assert value == key_only[column.name]
        elif column.nullable:
            assert value is None
        elif column.type == "numeric":
            assert value == 0 and value.as_tuple().exponent == -(column.scale or 0)
        else:
            assert value == neutral[column.type] and type(value) is type(neutral[column.type])
    assert (by_name["version"], by_name["is_deleted"]) == (99, 1)


def test_a_full_delete_keeps_its_values() -> None:
    purchase = table("Purchase")
    row = FIXED_ROWS["Purchase"]
    values = to_clickhouse_row(purchase, row, version=5, deleted=True)
    assert values[:-2] == to_clickhouse_row(purchase, row, version=5, deleted=False)[:-2]
    assert values[-1] == 1


@pytest.mark.parametrize(
    ("change", "deleted", "message"),
    [
        ({"amount": 1.5}, False, "Purchase.amount"),
        ({"amount": Decimal("1.0000001")}, False, "Purchase.amount"),
        ({"amount": Decimal("NaN")}, False, "Purchase.amount"),
        ({"createdAt": datetime(2026, 1, 1)}, False, "Purchase.createdAt"),
        ({"contentId": True}, False, "Purchase.contentId"),
        ({"buyer": None}, False, "Purchase.buyer"),
        ({"id": None}, True, "Purchase.id"),
    ],
)
def test_a_row_the_mirror_cannot_hold_is_refused_naming_the_column(
    change: dict[str, Any], deleted: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        to_clickhouse_row(table("Purchase"), {**FIXED_ROWS["Purchase"], **change}, version=1, deleted=deleted)


def test_a_live_row_missing_a_column_or_with_a_bad_version_is_refused() -> None:
    purchase = table("Purchase")
    row = {k: v for k, v in FIXED_ROWS["Purchase"].items() if k != "status"}
    with pytest.raises(ValueError, match=r"Purchase\.status"):
        to_clickhouse_row(purchase, row, version=1, deleted=False)
    with pytest.raises(ValueError, match="id"):
        to_clickhouse_row(purchase, {"status": "x"}, version=1, deleted=True)
    for version in (-1, True, 1.0):
        with pytest.raises(ValueError, match="version"):
            to_clickhouse_row(purchase, FIXED_ROWS["Purchase"], version=version, deleted=False)  # type: ignore[arg-type]


def test_timestamps_in_any_zone_reach_the_mirror_in_utc() -> None:
    heartbeat = table("heartbeat")
    paris = datetime(2026, 3, 29, 3, 30, tzinfo=timezone(timedelta(hours=2)))
    ts = to_clickhouse_row(heartbeat, {"id": 1, "ts": paris}, version=1, deleted=False)[1]
    assert ts == paris and ts.tzinfo is UTC and ts.hour == 1


# ---------------------------------------------------------------------------------------------------------------
# Elasticsearch


def test_document_id_is_the_key_as_text_or_joined_with_a_bar() -> None:
    assert document_id(table("Content"), (42,)) == "42"
    assert document_id(table("User"), ("0xabc",)) == "0xabc"
    composite = SyncedTable(
        name="Follow",
        key=("follower", "followee"),
        columns=(Column("follower", "text"), Column("followee", "bigint")),
        clickhouse_table="follows",
        elasticsearch_index="knowton-follows",
        description="test only",
    )
    assert document_id(composite, ("0xabc", 7)) == "0xabc|7"
    with pytest.raises(ValueError):
        document_id(composite, ("0x|abc", 7))
    with pytest.raises(ValueError):
        document_id(composite, ("0xabc",))


@given(st.sampled_from(INDEXED_TABLES).flatmap(lambda t: st.tuples(st.just(t), rows(t))), st.integers(0, 2**63 - 1))
def test_es_document_is_exact_and_round_trips(table_and_row: tuple[SyncedTable, dict], version: int) -> None:
    synced, row = table_and_row
    document = to_es_document(synced, row, version=version, deleted=False, indexed_at=INDEXED_AT)
    es_columns = [c for c in synced.columns if c.in_elasticsearch]
    assert list(document) == [c.target_name for c in es_columns] + ["pg_lsn", "is_deleted", "indexed_at"]
    assert (document["pg_lsn"], document["is_deleted"]) == (version, False)
    assert document["indexed_at"] == "2026-11-24T05:05:33.120000Z"
    # What Elasticsearch stores as _source is the JSON text of the document.
    source = json.loads(json.dumps(document, ensure_ascii=False))
    for column in es_columns:
        value, original = source[column.target_name], row[column.name]
        if original is None and column.nullable:
            assert value is None
        elif column.type == "numeric":
            assert isinstance(value, str) and Decimal(value) == original
            assert re.fullmatch(rf"-?\d+\.\d{{{column.scale}}}", value), value
        elif column.type == "timestamptz":
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), value
            assert datetime.fromisoformat(value) == original
        else:
            assert value == original


def test_es_numeric_strings_keep_trailing_zeros() -> None:
    content = table("Content")
    for price, expected in [("5", "5.00"), ("5.10", "5.10"), ("-0.00", "0.00"), ("9999999999.99", "9999999999.99")]:
        row = {**FIXED_ROWS["Content"], "price": Decimal(price)}
        document = to_es_document(content, row, version=1, deleted=False, indexed_at=INDEXED_AT)
        assert document["price"] == expected


@pytest.mark.parametrize("synced", INDEXED_TABLES, ids=lambda t: t.name)
def test_es_document_fields_are_exactly_the_strict_mapping(synced: SyncedTable) -> None:
    enrichment = {"creator_username": "probe", "sales_count": 3} if synced.name == "Content" else None
    document = to_es_document(
        synced, FIXED_ROWS[synced.name], version=1, deleted=False, indexed_at=INDEXED_AT, enrichment=enrichment
    )
    # The writer adds the stored hash (canonical hashing, not the transform): together they fill the mapping.
    document.update(es_hash_fields(synced, document))
    assert set(document) == set(es_mapping(synced))


@pytest.mark.parametrize("synced", INDEXED_TABLES, ids=lambda t: t.name)
def test_a_deleted_document_is_a_versioned_tombstone(synced: SyncedTable) -> None:
    key_only = {k: FIXED_ROWS[synced.name][k] for k in synced.key}
    document = to_es_document(
        synced, key_only, version=12, deleted=True, indexed_at=INDEXED_AT, enrichment={"sales_count": 1}
    )
    assert document == {
        **{synced.column(k).target_name: v for k, v in key_only.items()},
        "pg_lsn": 12,
        "is_deleted": True,
        "indexed_at": "2026-11-24T05:05:33.120000Z",
    }


def test_enrichment_is_added_verbatim_and_may_not_shadow_a_column() -> None:
    content = table("Content")
    row = FIXED_ROWS["Content"]
    enrichment = {"creator_username": "probe", "sales_count": 3}
    document = to_es_document(content, row, version=1, deleted=False, indexed_at=INDEXED_AT, enrichment=enrichment)
    assert {k: document[k] for k in enrichment} == enrichment
    for clash in ("price", "created_at", "createdAt", "pg_lsn", "is_deleted", "indexed_at"):
        with pytest.raises(ValueError, match=clash):
            to_es_document(content, row, version=1, deleted=False, indexed_at=INDEXED_AT, enrichment={clash: 1})


@pytest.mark.parametrize("synced", [t for t in CDC_TABLES if not t.elasticsearch_index], ids=lambda t: t.name)
def test_a_table_without_an_index_has_no_document(synced: SyncedTable) -> None:
    with pytest.raises(ValueError, match="no Elasticsearch index"):
        to_es_document(synced, FIXED_ROWS[synced.name], version=1, deleted=False, indexed_at=INDEXED_AT)


def test_columns_kept_out_of_elasticsearch_are_not_in_the_document() -> None:
    notes = SyncedTable(
        name="Note",
        key=("id",),
        columns=(Column("id", "bigint"), Column("secretNote", "text", in_elasticsearch=False)),
        clickhouse_table="notes",
        elasticsearch_index="knowton-notes",
        description="test only",
    )
    document = to_es_document(notes, {"id": 1, "secretNote": "x"}, version=1, deleted=False, indexed_at=INDEXED_AT)
    assert "secret_note" not in document and document["id"] == 1
    assert clickhouse_columns(notes) == ["id", "secret_note", "version", "is_deleted"]


def test_the_real_event_reaches_both_targets_through_the_one_transform() -> None:
    event = decode_event("cdc-User", REAL_KEY, REAL_VALUE)
    assert event is not None
    values = to_clickhouse_row(event.table, event.row, version=event.lsn, deleted=event.is_delete)
    assert values == [
        "0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "probe",
        None,
        None,
        None,
        0,
        False,
        datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC),
        datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC),
        30897912,
        0,
    ]
    document = to_es_document(event.table, event.row, version=event.lsn, deleted=False, indexed_at=INDEXED_AT)
    assert document_id(event.table, event.key) == "0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    assert document["created_at"] == "2026-11-24T05:05:32.487591Z" and document["pg_lsn"] == 30897912


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
def test_a_search_document_refuses_jsonb_holding_a_number_beyond_a_double(number: float) -> None:
    # psycopg's json.loads reads a jsonb number beyond a double as an infinity; orjson would write it as null.
    content = table("Content")
    row = {**FIXED_ROWS["Content"], "metadata": {"x": [1.5, {"y": number}]}}
    with pytest.raises(ValueError, match="beyond a double"):
        to_es_document(content, row, version=1, deleted=False, indexed_at=INDEXED_AT)
    fine = to_es_document(
        content, {**row, "metadata": {"x": [1.5, {"y": 1e308}]}}, version=1, deleted=False, indexed_at=INDEXED_AT
    )
    assert fine["metadata"] == {"x": [1.5, {"y": 1e308}]}
