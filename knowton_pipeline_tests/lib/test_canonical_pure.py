"""Canonical rows and hashes (`knowton_pipeline.lib.canonical`) without a store: the string keeps apart what must
differ (NULL, '' and '\\N'; array element boundaries), equates what must be equal (JSON key order, 1.0 and 1, -0 and
0, trailing decimal zeros), reads Elasticsearch documents back exactly, and the hash is the 60-bit MD5 slice.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from knowton_pipeline.catalog import CDC_TABLES, TABLES, SyncedTable, table
from knowton_pipeline.lib.canonical import (
    INVALID,
    NULL,
    SEPARATOR,
    _spelled_json,
    canonical_from_row,
    canonical_json_value,
    column_names,
    json_number,
    row_hash,
    segment_parameters,
)
from knowton_pipeline.lib.debezium import decode_row, encode_row_like_debezium
from knowton_pipeline.lib.stores.clickhouse import segment_checksum_sql as clickhouse_segment_checksum_sql
from knowton_pipeline.lib.stores.clickhouse import segment_rows_sql as clickhouse_segment_rows_sql
from knowton_pipeline.lib.stores.elasticsearch import (
    _document_fields,
    _es_field,
    canonical_from_es_source,
    enrichment_from_es_source,
    es_hash_fields,
    es_segment_query,
    es_source_fields,
    row_from_es_source,
)
from knowton_pipeline.lib.stores.postgres import segment_checksum_sql as postgres_segment_checksum_sql
from knowton_pipeline.lib.transform import canonical_json, to_es_document
from knowton_pipeline_tests.helpers import python_segment_checksum, sources_checksum
from knowton_pipeline_tests.lib.test_debezium import (
    FIXED_ROWS,
    NASTY_TEXT,
    column_values,
    decimals,
    json_values,
    rows,
    tables_and_rows,
)
from knowton_pipeline_tests.lib.test_transform import reorder

USER, CONTENT, PURCHASE = table("User"), table("Content"), table("Purchase")
INDEXED_TABLES = [t for t in TABLES if t.elasticsearch_index]
INDEXED_AT = datetime(2026, 11, 24, 5, 5, 33, tzinfo=UTC)
FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


# What the enriched query could return for the derived fields; their spelling does not depend on plausibility.
CONTENT_ENRICHMENT = {"creator_username": "creator name", "sales_count": 12}


def enrichments(synced: SyncedTable) -> st.SearchStrategy[dict[str, Any]]:
    """Values of `synced`'s derived fields, by their declared type and nullability."""
    return st.fixed_dictionaries({f.name: column_values(f.column) for f in synced.derived})


def documents(synced: SyncedTable) -> st.SearchStrategy[tuple[SyncedTable, dict, dict]]:
    return st.tuples(st.just(synced), rows(synced), enrichments(synced))


def fields(synced: SyncedTable, row: dict[str, Any]) -> dict[str, str]:
    """The canonical string of `row` cut back into its fields, by column name."""
    parts = canonical_from_row(synced, row).split(SEPARATOR)
    assert len(parts) == len(synced.columns)
    return dict(zip([c.name for c in synced.columns], parts, strict=True))


def json_as_decimals(text: str) -> Any:
    """JSON numbers compared as the decimals they spell (1e16 == 10000000000000000, as in PostgreSQL's jsonb)."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def unescape_text(field: str) -> str | None:
    """The inverse of the text spelling: proves it loses nothing."""
    if field == NULL:
        return None
    assert re.fullmatch(r"(?:[^\\\t]|\\[\\t])*", field), field
    return re.sub(r"\\(.)", lambda m: "\t" if m.group(1) == "t" else m.group(1), field)


def parse_text_array(field: str) -> list[str]:
    """The inverse of the text[] spelling."""
    assert field.startswith("{") and field.endswith("}") and "\t" not in field
    elements = re.findall(r'"((?:[^"\\]|\\.)*)"(?:,|$)', field[1:-1])
    assert "{" + ",".join(f'"{e}"' for e in elements) + "}" == field
    return [re.sub(r"\\(.)", lambda m: "\t" if m.group(1) == "t" else m.group(1), e) for e in elements]


# ---------------------------------------------------------------------------------------------------------------
# The hash


@given(st.text())
def test_row_hash_is_the_last_15_hex_digits_of_md5_of_the_utf8_bytes(text: str) -> None:
    try:
        data = text.encode()
    except UnicodeEncodeError:
        return  # lone surrogates: never in a row read from a store
    expected = int(hashlib.md5(data).hexdigest()[-15:], 16)
    assert row_hash(text) == expected
    assert 0 <= row_hash(text) < 2**60


def test_row_hash_matches_the_value_postgres_and_clickhouse_computed_for_abc() -> None:
    # ('x' || right(md5('abc'), 15))::bit(60)::bigint in PostgreSQL and
    # bitAnd(reinterpretAsUInt64(reverse(substring(MD5('abc'), 9, 8))), 2^60 - 1) in ClickHouse, both 474636617523494770.
    assert row_hash("abc") == 474636617523494770


# ---------------------------------------------------------------------------------------------------------------
# The string: one field per column, each one reversible


@given(tables_and_rows())
def test_canonical_row_has_one_tab_separated_field_per_catalog_column(table_and_row: tuple[SyncedTable, dict]) -> None:
    synced, row = table_and_row
    parts = fields(synced, row)
    for column in synced.columns:
        value, field = row[column.name], parts[column.name]
        if column.type == "text":
            assert unescape_text(field) == value
        elif column.type == "text[]":
            assert parse_text_array(field) == value
        elif column.type == "jsonb":
            assert json_as_decimals(field) == json_as_decimals(canonical_json(value))
        elif value is None:
            assert field == NULL


def test_null_empty_text_and_backslash_n_text_are_three_different_rows() -> None:
    spelled = {
        bio: fields(USER, {**FIXED_ROWS["User"], "bio": bio})["bio"] for bio in (None, "", "\\N", "\\", "\\\\", "\t")
    }
    assert spelled == {None: "\\N", "": "", "\\N": "\\\\N", "\\": "\\\\", "\\\\": "\\\\\\\\", "\t": "\\t"}


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (["a,b"], ["a", "b"]),
        ([], [""]),
        ([""], ["", ""]),
        (['a","b'], ["a", "b"]),
        (["a\\"], ["a\\\\"]),
        (["\t"], ["\\t"]),
    ],
)
def test_text_arrays_keep_their_element_boundaries(left: list[str], right: list[str]) -> None:
    spell = lambda tags: fields(CONTENT, {**FIXED_ROWS["Content"], "tags": tags})["tags"]  # noqa: E731
    assert spell(left) != spell(right)


@given(st.lists(NASTY_TEXT, max_size=4), st.lists(NASTY_TEXT, max_size=4))
def test_different_text_arrays_never_share_a_spelling(left: list[str], right: list[str]) -> None:
    spell = lambda tags: fields(CONTENT, {**FIXED_ROWS["Content"], "tags": tags})["tags"]  # noqa: E731
    assert (spell(left) == spell(right)) == (left == right)


def test_canonical_string_of_a_fixed_row_is_pinned() -> None:
    row = {
        **FIXED_ROWS["Content"],
        "id": 2**63 - 1,
        "title": "tab\there \\N",
        "description": None,
        "tags": ["a,b", "", 'q"'],
        "price": Decimal("-0.00"),
        "metadata": {"b": 1, "a": {"d": [1, 2.5, "x"], "c": None}, "é": 1e16},
        "createdAt": datetime(1970, 1, 1, tzinfo=UTC),
        "updatedAt": datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    }
    assert canonical_from_row(CONTENT, row) == "\t".join(
        [
            "9223372036854775807",
            "0xSECRET",
            "tab\\there \\\\N",
            "\\N",
            "SECRETmusic",
            '{"a,b","","q\\""}',
            "0.00",
            "SECRETpublished",
            '{"a":{"c":null,"d":[1,2.5,"x"]},"b":1,"é":10000000000000000}',
            "1970-01-01T00:00:00.000000Z",
            "2099-12-31T23:59:59.999999Z",
        ]
    )


def test_booleans_are_t_and_f_and_the_heartbeat_has_two_fields() -> None:
    assert fields(USER, {**FIXED_ROWS["User"], "isVerified": True})["isVerified"] == "t"
    assert fields(USER, {**FIXED_ROWS["User"], "isVerified": False})["isVerified"] == "f"
    assert canonical_from_row(table("heartbeat"), FIXED_ROWS["heartbeat"]) == "1\t1970-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"isVerified": 1}, "User.isVerified"),
        ({"reputation": True}, "User.reputation"),
        ({"createdAt": datetime(2026, 1, 1)}, "User.createdAt"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_column(change: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        canonical_from_row(USER, {**FIXED_ROWS["User"], **change})


# ---------------------------------------------------------------------------------------------------------------
# Equal values, equal strings


@given(st.datetimes(timezones=st.just(UTC)), st.integers(-23 * 60, 23 * 60))
def test_a_timestamp_is_spelled_in_utc_whatever_its_offset(instant: datetime, minutes: int) -> None:
    try:
        shifted = instant.astimezone(timezone(timedelta(minutes=minutes)))
    except OverflowError:
        return
    assert fields(PURCHASE, {**FIXED_ROWS["Purchase"], "createdAt": shifted}) == fields(
        PURCHASE, {**FIXED_ROWS["Purchase"], "createdAt": instant}
    )


@given(decimals(6, 20))
def test_decimals_are_spelled_at_the_column_scale_whatever_their_own(amount: Decimal) -> None:
    spell = lambda a: fields(PURCHASE, {**FIXED_ROWS["Purchase"], "amount": a})["amount"]  # noqa: E731
    field = spell(amount)
    assert spell(amount.normalize()) == field  # 1.500000, 1.5 and 15E-1 are one value
    assert re.fullmatch(r"-?\d+\.\d{6}", field) and Decimal(field) == amount
    assert field != "-0.000000"


def test_negative_zero_is_zero() -> None:
    spell = lambda p: fields(CONTENT, {**FIXED_ROWS["Content"], "price": p})["price"]  # noqa: E731
    assert spell(Decimal("-0.00")) == spell(Decimal("0")) == spell(Decimal("0E-7")) == "0.00"
    assert json_number(-0.0) == json_number(0.0) == json_number(0) == "0"


@given(json_values(NASTY_TEXT))
def test_json_key_order_does_not_change_the_spelling(value: Any) -> None:
    assert canonical_json_value(reorder(value)) == canonical_json_value(value)


@given(json_values(NASTY_TEXT))
def test_canonical_json_is_valid_compact_json_of_the_same_value(value: Any) -> None:
    text = canonical_json_value(value)
    assert json_as_decimals(text) == json_as_decimals(json.dumps(value))
    # Re-reading the mirror's text (transform.canonical_json) or an Elasticsearch _source gives the same spelling.
    assert canonical_json_value(json.loads(canonical_json(value))) == text
    assert "\t" not in text and not text.startswith("\\")


@given(json_values(NASTY_TEXT), st.lists(FINITE_FLOATS, max_size=4))
def test_canonical_json_written_by_orjson_is_the_definitions_text(value: Any, numbers: list[float]) -> None:
    # canonical_json_value lets orjson write the usual value; `_spelled_json` is the definition.
    for v in (value, [value, *numbers], {"n": numbers, "v": value}):
        assert canonical_json_value(v) == _spelled_json(v)
    for number in (1.0, 0.0, -0.0, 1e-4, 9.999e-5, 1e16, 9999999999999998.0, 0.5, 2**64, -(2**63) - 1, True):
        assert canonical_json_value([number]) == _spelled_json([number])


@given(FINITE_FLOATS)
def test_a_json_float_is_spelled_as_the_exact_decimal_its_repr_names(number: float) -> None:
    spelled = json_number(number)
    assert re.fullmatch(r"-?(0|[1-9]\d*)(\.\d*[1-9])?", spelled), spelled
    assert Decimal(spelled) == Decimal(repr(number))
    assert spelled != "-0"
    if number.is_integer():
        # As PostgreSQL holds it once Python's json.dumps wrote it: 1e16 arrives as the integer 10000000000000000.
        assert spelled == str(int(Decimal(repr(number))))


@given(FINITE_FLOATS, FINITE_FLOATS)
def test_different_json_floats_have_different_spellings(a: float, b: float) -> None:
    assert (json_number(a) == json_number(b)) == (a == b)


@pytest.mark.parametrize(
    ("value", "spelled"),
    [
        (1.0, "1"),
        (1.5e-07, "0.00000015"),
        (1e16, "10000000000000000"),
        (1e23, "100000000000000000000000"),
        (-2.5, "-2.5"),
        (0.1, "0.1"),
        (2**70, "1180591620717411303424"),
        (-(2**63), "-9223372036854775808"),
        (5e-324, "0." + "0" * 323 + "5"),
    ],
)
def test_json_numbers_have_one_plain_spelling(value: int | float, spelled: str) -> None:
    assert json_number(value) == spelled


def test_json_refuses_what_is_not_json() -> None:
    for bad in (float("nan"), float("inf"), Decimal("1.5"), {1: "x"}, {"a": object()}):
        with pytest.raises((TypeError, ValueError)):
            canonical_json_value(bad)


def test_json_strings_are_escaped_as_jsonb_prints_them() -> None:
    # What PostgreSQL's to_jsonb(text)::text prints for the same string (checked on PostgreSQL 15).
    value = 'a\x01\t"\\/\u2028\x7f é🚀'
    assert canonical_json_value(value) == '"a\\u0001\\t\\"\\\\/\u2028\x7f é🚀"'


# ---------------------------------------------------------------------------------------------------------------
# Elasticsearch _source


@given(st.sampled_from(INDEXED_TABLES).flatmap(documents))
def test_a_search_document_reads_back_to_the_row_it_was_written_from(document: tuple[SyncedTable, dict, dict]) -> None:
    synced, row, enrichment = document
    written = to_es_document(synced, row, version=7, deleted=False, indexed_at=INDEXED_AT, enrichment=enrichment)
    source = json.loads(json.dumps(written))
    expected = canonical_from_row(synced, row, shape="document", enrichment=enrichment)
    assert canonical_from_es_source(synced, source) == expected
    read_back = canonical_from_row(
        synced,
        row_from_es_source(synced, source),
        shape="document",
        enrichment=enrichment_from_es_source(synced, source),
    )
    assert read_back == expected
    # An enriched row (as the enriched query returns it) carries its derived fields itself.
    assert canonical_from_row(synced, {**row, **enrichment}, shape="document") == expected


@given(documents(CONTENT), enrichments(CONTENT))
def test_derived_fields_are_spelled_alike_by_python_and_from_the_document_and_told_apart(
    document: tuple[SyncedTable, dict, dict], other: dict[str, Any]
) -> None:
    _, row, enrichment = document
    names = column_names(CONTENT, "document")
    assert names[-len(CONTENT.derived) :] == [f.name for f in CONTENT.derived]
    source = json.loads(json.dumps(to_es_document(CONTENT, row, version=1, deleted=False, indexed_at=INDEXED_AT)))
    python = canonical_from_row(CONTENT, row, shape="document", enrichment=other).split(SEPARATOR)
    from_es = canonical_from_es_source(CONTENT, {**source, **other}).split(SEPARATOR)
    assert python == from_es
    # Two enrichments spell alike exactly when they are equal (NULL, '' and '\N' usernames are three values).
    mine = canonical_from_row(CONTENT, row, shape="document", enrichment=enrichment).split(SEPARATOR)
    differing = [n for n, a, b in zip(names, mine, python, strict=True) if a != b]
    assert differing == [f.name for f in CONTENT.derived if enrichment[f.name] != other[f.name]]


def test_bookkeeping_fields_are_not_part_of_the_canonical_row_but_derived_fields_are() -> None:
    row = FIXED_ROWS["Content"]
    first = to_es_document(CONTENT, row, version=1, deleted=False, indexed_at=INDEXED_AT, enrichment=CONTENT_ENRICHMENT)
    later = to_es_document(
        CONTENT,
        row,
        version=99,
        deleted=False,
        indexed_at=INDEXED_AT + timedelta(days=1),
        enrichment=CONTENT_ENRICHMENT,
    )
    assert canonical_from_es_source(CONTENT, {**later, "row_hash": "x"}) == canonical_from_es_source(CONTENT, first)
    sold = canonical_from_es_source(CONTENT, {**first, "sales_count": 13})
    renamed = canonical_from_es_source(CONTENT, {**first, "creator_username": "someone else"})
    assert len({sold, renamed, canonical_from_es_source(CONTENT, first)}) == 3
    # The writer's stored hash covers them too, so the fast mode sees a document written with a stale enrichment.
    assert es_hash_fields(CONTENT, first) != es_hash_fields(CONTENT, {**first, "sales_count": 13})
    assert {"creator_username", "sales_count"} <= set(es_source_fields(CONTENT))
    # A mirror holds only the table's own columns.
    assert canonical_from_row(CONTENT, row) == SEPARATOR.join(
        canonical_from_es_source(CONTENT, first).split(SEPARATOR)[: len(CONTENT.columns)]
    )


def test_a_document_written_without_its_derived_fields_is_invalid_in_them() -> None:
    plain = to_es_document(CONTENT, FIXED_ROWS["Content"], version=1, deleted=False, indexed_at=INDEXED_AT)
    assert canonical_from_es_source(CONTENT, plain).split(SEPARATOR)[-2:] == [INVALID, INVALID]
    with pytest.raises(KeyError):
        canonical_from_row(CONTENT, FIXED_ROWS["Content"], shape="document")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("price", "abc"),
        ("price", "5.001"),
        ("created_at", 0),
        ("created_at", "2026-01-01T00:00:00"),
        ("tags", "one"),
        ("tags", [1]),
        ("id", "9"),
        ("title", None),
        ("sales_count", "12"),
        ("sales_count", None),
        ("creator_username", 7),
    ],
)
def test_a_hand_edited_document_is_spelled_invalid_not_an_error(field: str, value: Any) -> None:
    source = to_es_document(
        CONTENT, FIXED_ROWS["Content"], version=1, deleted=False, indexed_at=INDEXED_AT, enrichment=CONTENT_ENRICHMENT
    )
    spelled = canonical_from_es_source(CONTENT, {**source, field: value})
    assert spelled.split(SEPARATOR).count(INVALID) == 1
    assert spelled != canonical_from_row(
        CONTENT, FIXED_ROWS["Content"], shape="document", enrichment=CONTENT_ENRICHMENT
    )
    read = enrichment_from_es_source if field in CONTENT_ENRICHMENT else row_from_es_source
    with pytest.raises(ValueError, match=r"Content\."):
        read(CONTENT, {**source, field: value})


def test_a_document_missing_a_column_is_invalid_and_a_float_price_is_its_value() -> None:
    source = to_es_document(CONTENT, FIXED_ROWS["Content"], version=1, deleted=False, indexed_at=INDEXED_AT)
    missing = {k: v for k, v in source.items() if k != "description"}
    assert canonical_from_es_source(CONTENT, missing).split(SEPARATOR)[3] == INVALID
    assert canonical_from_es_source(CONTENT, {**source, "metadata": {"a": float("nan")}}).split(SEPARATOR)[8] == INVALID
    assert canonical_from_es_source(CONTENT, {**source, "price": 5.0}) == canonical_from_es_source(CONTENT, source)


def test_segment_checksum_over_search_documents_skips_tombstones() -> None:
    row = FIXED_ROWS["User"]
    live = to_es_document(USER, row, version=1, deleted=False, indexed_at=INDEXED_AT)
    tombstone = to_es_document(USER, {"address": "0xgone"}, version=2, deleted=True, indexed_at=INDEXED_AT)
    assert sources_checksum(USER, [live, tombstone]) == python_segment_checksum(USER, [row])
    assert python_segment_checksum(USER, []) == (0, 0)


@given(st.lists(tables_and_rows(), max_size=5))
def test_python_segment_checksum_is_count_and_sum_of_row_hashes(items: list[tuple[SyncedTable, dict]]) -> None:
    for synced in CDC_TABLES:
        picked = [r for t, r in items if t is synced]
        expected = sum(row_hash(canonical_from_row(synced, r)) for r in picked)
        assert python_segment_checksum(synced, picked) == (len(picked), expected)


@given(tables_and_rows())
def test_the_debezium_path_gives_the_same_canonical_row(table_and_row: tuple[SyncedTable, dict]) -> None:
    synced, row = table_and_row
    decoded = decode_row(synced, json.loads(json.dumps(encode_row_like_debezium(synced, row))))
    assert canonical_from_row(synced, decoded) == canonical_from_row(synced, row)


# ---------------------------------------------------------------------------------------------------------------
# The SQL: parameters, never values; quoted identifiers; live mirror rows only


def test_segment_queries_take_parameters_and_quote_identifiers() -> None:
    pg = postgres_segment_checksum_sql(USER, relation=sql.Identifier("ops", 'odd"name')).as_string(None)
    assert 'FROM "ops"."odd""name" AS t' in pg
    assert '"t"."address" COLLATE "C" >= %(lo_0)s::text AND "t"."address" COLLATE "C" < %(hi_0)s::text' in pg
    assert "ops.canonical_jsonb" not in pg and 'to_char("t"."createdAt" AT TIME ZONE \'UTC\'' in pg
    open_ended = postgres_segment_checksum_sql(CONTENT, lower_bound=False, upper_bound=False).as_string(None)
    assert open_ended.endswith("WHERE true") and 'ops.canonical_jsonb("t"."metadata")' in open_ended

    # A search document's derived fields are computed by the catalog's definition, identifiers quoted.
    search = postgres_segment_checksum_sql(CONTENT, shape="document").as_string(None)
    assert '(SELECT u."username" FROM "public"."User" AS u WHERE u."address" = "t"."creator")' in search
    assert 'FROM "public"."Purchase" AS p WHERE p."contentId" = "t"."id"' in search
    assert '"Purchase"' not in open_ended and '"User"' not in open_ended
    stand_in = postgres_segment_checksum_sql(
        CONTENT, shape="document", sources={"User": sql.Identifier("ops", "scratch_user")}
    ).as_string(None)
    assert 'FROM "ops"."scratch_user" AS u' in stand_in and '"public"."User"' not in stand_in

    ch = clickhouse_segment_checksum_sql(CONTENT, database="scratch")
    assert "FROM `scratch`.`contents` FINAL WHERE `is_deleted` = 0" in ch
    assert "`id` >= {lo_0:Int64} AND `id` < {hi_0:Int64}" in ch and "sum(toUInt128(" in ch
    rows_sql = clickhouse_segment_rows_sql(USER, lower_bound=False)
    assert (
        "FROM `knowton`.`users` FINAL WHERE `is_deleted` = 0 AND `address` < {hi_0:String} ORDER BY `address`"
        in rows_sql
    )


def test_segment_parameters_name_each_key_column() -> None:
    assert segment_parameters(CONTENT, 5, 10) == {"lo_0": 5, "hi_0": 10}
    assert segment_parameters(USER, None, "0xb") == {"hi_0": "0xb"}
    assert segment_parameters(CONTENT, (5,), None) == {"lo_0": 5}
    with pytest.raises(ValueError, match="key has 1 values"):
        segment_parameters(CONTENT, (1, 2), None)


def test_es_segment_query_excludes_tombstones_and_bounds_the_key() -> None:
    assert es_segment_query(USER, "0xa", "0xb") == {
        "bool": {
            "filter": [{"range": {"address": {"gte": "0xa", "lt": "0xb"}}}],
            "must_not": [{"term": {"is_deleted": True}}],
        }
    }
    assert es_segment_query(CONTENT)["bool"]["filter"] == []


def _near_canonical(scale: int) -> st.SearchStrategy[Any]:
    """Values a hand-edited field may hold: canonical spellings and the ones next to them."""
    digit = st.sampled_from("0123456789")
    timestamps = st.builds(
        lambda y, mo, d, h, mi, s, f, sep, end: f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}:{s:02d}.{f:06d}{end}",
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 61),
        st.integers(0, 999_999),
        st.sampled_from(["T", "T", " ", "t"]),
        st.sampled_from(["Z", "Z", "z", "+00:00", ""]),
    )
    decimals_text = st.builds(
        lambda sign, whole, fraction: f"{sign}{whole}{'.' if fraction is not None else ''}{fraction or ''}",
        st.sampled_from(["", "", "-", "+"]),
        st.text(digit, min_size=1, max_size=45),
        st.none() | st.text(digit, min_size=0, max_size=scale + 2),
    )
    return st.one_of(
        timestamps,
        decimals_text,
        st.sampled_from(["2025-W01-1T00:00:01.000000Z", "2025-01-01T24:00:00.000000Z", "-0.00", "-0", "0.00", "٣.00"]),
        NASTY_TEXT,
        st.none(),
        st.integers(),
        st.floats(),
        st.booleans(),
    )


@given(st.sampled_from(INDEXED_TABLES).flatmap(documents), st.data())
def test_fields_of_a_hand_edited_document_are_spelled_as_their_definition_says(
    document: tuple[SyncedTable, dict, dict], data: st.DataObject
) -> None:
    # canonical_from_es_source checks an already canonical timestamp, decimal or text instead of reading it: the same
    # text as the field's definition (`_es_field`), whatever a field holds.
    synced, row, enrichment = document
    source = to_es_document(synced, row, version=7, deleted=False, indexed_at=INDEXED_AT, enrichment=enrichment)
    columns, derived = _document_fields(synced)
    for doc_field in data.draw(st.lists(st.sampled_from([*columns, *derived]), max_size=3), label="edited"):
        column = doc_field.field.column
        source[column.target_name] = data.draw(_near_canonical(column.scale or 0), label=column.target_name)
    expected = SEPARATOR.join(_es_field(f, source) for f in (*columns, *derived))
    assert canonical_from_es_source(synced, source) == expected


TRICKY_VALUES = [
    "-0.00", "-0", "0.00", "-0.50", "079.19", "+79.19", "79.1", "79.190", "79.19", "٣.00", "1" * 39 + ".00",
    "1" * 38 + ".00", "2025-W01-1T00:00:01.000000Z", "2025-01-01T24:00:00.000000Z", "2025-02-30T00:00:00.000000Z",
    "2025-01-01T00:00:01.000000Z", "2025-01-01 00:00:01.000000Z", "2025-01-01T00:00:01.000000+00:00", "a\\b", "a\tb",
    "", None, 5, 5.0, True, 2**70, [1], {"a": 1.0},
]  # fmt: skip


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_every_field_holding_a_value_next_to_a_canonical_spelling_is_spelled_as_its_definition_says(value: Any) -> None:
    for synced in INDEXED_TABLES:
        source = to_es_document(
            synced, FIXED_ROWS[synced.name], version=1, deleted=False, indexed_at=INDEXED_AT,
            enrichment=CONTENT_ENRICHMENT if synced is CONTENT else None,
        )  # fmt: skip
        columns, derived = _document_fields(synced)
        for doc_field in (*columns, *derived):
            edited = {**source, doc_field.field.column.target_name: value}
            expected = SEPARATOR.join(_es_field(f, edited) for f in (*columns, *derived))
            assert canonical_from_es_source(synced, edited) == expected, doc_field.field.column.name
