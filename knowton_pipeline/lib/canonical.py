"""Canonical rows and their hashes, the common ground of reconciliation (DESIGN.md "Canonical rows and hashes").

A row's canonical string is spelled identically by PostgreSQL SQL, by ClickHouse SQL over the mirror and by Python
(over a row or an Elasticsearch `_source`), all derived from the catalog; per key segment each store returns the
row count and the sum of `row_hash` over its rows, so only mismatching segments need to travel.

The canonical string: the table's catalog columns in catalog order, joined by a tab; for a search document, its
columns then its derived fields (`SyncedTable.derived`, in declaration order), which PostgreSQL computes by the
catalog's definition, Python takes from the enrichment and Elasticsearch reads from `_source`. Each field:

- SQL NULL: `\\N`. A field that cannot be a column value (only from a hand-edited `_source`): `\\!`.
- text: the UTF-8 text with backslash written `\\\\` and tab written `\\t`, so no field holds a raw tab and the text
  `\\N` (spelled `\\\\N`) never looks like NULL.
- int, bigint: decimal digits, `-` when negative.
- bool: `t` or `f`.
- numeric(p, s): plain decimal with exactly s digits after the point (`0.50`, `-12.00`), never negative zero.
- timestamptz: UTC, six fraction digits, `2026-11-24T05:05:32.000000Z` (as `transform.format_timestamp`).
- text[]: `{"a","b,c"}`: every element quoted, with backslash, double quote and tab escaped by a backslash; an
  element that is NULL (PostgreSQL only: the mirrors cannot hold one) is an unquoted `NULL`.
- jsonb: canonical JSON (`canonical_json_value`): keys sorted by code point, no whitespace, strings escaped as
  Python's json module does with ensure_ascii=False (which is also how jsonb prints them), numbers as their exact
  decimal value (see `json_number`). Valid JSON never holds a raw tab and never starts with a backslash.

`row_hash` is the last 15 hex digits of the MD5 of the canonical string's UTF-8 bytes, as an integer: 60 bits, so
0 <= hash < 2**60 and a sum over 2**68 rows still fits ClickHouse's UInt128 (PostgreSQL sums into numeric, Python
into int, both exact).
"""

from __future__ import annotations

import hashlib
import json.encoder
import math
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal
from operator import itemgetter
from typing import Any, Literal

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from psycopg import sql

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, Column, DerivedField, SyncedTable
from knowton_pipeline.catalog import table as catalog_table
from knowton_pipeline.lib.transform import (
    CLICKHOUSE_DELETED_COLUMN,
    ES_DELETED_FIELD,
    decimal_text,
    exact_decimal,
    format_timestamp,
)

SEPARATOR = "\t"
NULL = "\\N"
# Only Python over an Elasticsearch `_source` writes it: a field that no column value could produce.
INVALID = "\\!"
HASH_BITS = 60
HASH_MASK = (1 << HASH_BITS) - 1

# Which columns a canonical row covers: a mirror holds every catalog column, a search document the columns
# marked `in_elasticsearch` and its derived fields. PostgreSQL spells either, to compare with either target.
Target = Literal["clickhouse", "elasticsearch"]

_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring
_MISSING: Any = object()
# A repr has at most 17 digits; an explicit context keeps normalize() exact whatever the thread's context says.
_JSON_DECIMALS = Context(prec=40)


# ---------------------------------------------------------------------------------------------------------------
# Python spellings


def row_hash(canonical: str) -> int:
    """The last 15 hex digits of MD5(UTF-8 bytes) as an int: 0 <= hash < 2**60, as the SQL spellings compute it."""
    # A checksum, not a secret: usedforsecurity=False keeps it available on FIPS builds.
    digest = hashlib.md5(canonical.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[8:], "big") & HASH_MASK


def json_number(value: int | float) -> str:
    """A JSON number as its exact decimal value: plain digits, no exponent, no trailing fraction zeros, no `-0`.

    A float stands for the decimal its shortest repr spells (what JSON carries), so 1.0 and 1, 1e16 and
    10000000000000000, -0.0 and 0 are each one number; NaN and infinities are refused (they are not JSON).
    PostgreSQL (ops.canonical_json_number) first rounds a jsonb number with a fraction to the nearest double,
    since that is all psycopg and the Debezium decoder hand on; integers stay exact everywhere.
    """
    if type(value) is int:
        return str(value)
    if type(value) is not float:
        raise TypeError(f"expected a JSON number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON numbers")
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return format(Decimal(repr(value)).normalize(_JSON_DECIMALS), "f")


def canonical_json_value(value: Any) -> str:
    """A JSON value (as json.loads returns it) as canonical JSON text; see the module docstring."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    kind = type(value)
    if kind is str:
        return _encode_json_string(value)
    if kind is int or kind is float:
        return json_number(value)
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise TypeError(f"JSON object keys are strings, got {type(key).__name__}")
        members = sorted(value.items(), key=itemgetter(0))
        return "{" + ",".join(_encode_json_string(k) + ":" + canonical_json_value(v) for k, v in members) + "}"
    if kind is list or kind is tuple:
        return "[" + ",".join(canonical_json_value(v) for v in value) + "]"
    raise TypeError(f"not a JSON value: {kind.__name__}")


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected str, got {type(value).__name__}")
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\t" in value:
        value = value.replace("\t", "\\t")
    return value


def _integer(value: Any) -> str:
    if type(value) is not int:
        raise TypeError(f"expected int, got {type(value).__name__}")
    return str(value)


def _boolean(value: Any) -> str:
    if type(value) is not bool:
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return "t" if value else "f"


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if type(value) is not str:
        raise TypeError(f"expected a list of str, got an element of type {type(value).__name__}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'


def _text_array(value: Any) -> str:
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of str, got {type(value).__name__}")
    return "{" + ",".join(map(_array_element, value)) + "}"


def _numeric_for(scale: int) -> Callable[[Any], str]:
    def spell(value: Any) -> str:
        return decimal_text(value, scale)  # refuses floats and values with more digits than the scale

    return spell


def _python_spelling(column: Column) -> Callable[[Any], str]:
    """Python value (as psycopg or the Debezium decoder give it) -> field text, for a non-None value."""
    return {
        "text": _text,
        "int": _integer,
        "bigint": _integer,
        "bool": _boolean,
        "numeric": _numeric_for(column.scale or 0),
        "timestamptz": format_timestamp,
        "text[]": _text_array,
        "jsonb": canonical_json_value,
    }[column.type]


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


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL spellings: expressions over `alias.column`. E'' literals mean the same whatever
# standard_conforming_strings says. text[] and jsonb need the functions in sql/postgres/canonical.sql.

_PG_NULL = sql.SQL(r"E'\\N'")
_PG_SEPARATOR = sql.SQL(r" || E'\t' || ")
_PG_TEXT = r"replace(replace({v}, E'\\', E'\\\\'), E'\t', E'\\t')"
_PG_TIMESTAMP = "to_char({v} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def _postgres_spelling(column: Column) -> Callable[[sql.Composable], sql.Composable]:
    templates = {
        "text": _PG_TEXT,
        "int": "{v}::text",
        "bigint": "{v}::text",
        "bool": "CASE WHEN {v} THEN 't' ELSE 'f' END",
        # round() pins the scale even where the column's typmod would not (a view, an unconstrained numeric).
        "numeric": "round({v}, {scale})::text",
        "timestamptz": _PG_TIMESTAMP,
        "text[]": "ops.canonical_text_array({v})",
        "jsonb": "ops.canonical_jsonb({v})",
    }
    template = sql.SQL(templates[column.type])
    scale = sql.Literal(column.scale or 0)

    def spell(value: sql.Composable) -> sql.Composable:
        expression = template.format(v=value, scale=scale) if column.type == "numeric" else template.format(v=value)
        # Every column, NOT NULL or not: a NULL must never turn the whole row's string into NULL.
        return sql.SQL("coalesce({}, {})").format(expression, _PG_NULL)

    return spell


PG_KEY_TYPES = {"text": "text", "int": "integer", "bigint": "bigint"}


# ---------------------------------------------------------------------------------------------------------------
# ClickHouse spellings: expressions over the mirror's columns (the transform's output: String, Int32/Int64, Bool,
# Decimal(p, s), DateTime64(6, 'UTC'), Array(String), and the jsonb as transform.canonical_json text).

_CH_TEXT = r"replaceAll(replaceAll({v}, '\\', '\\\\'), '\t', '\\t')"
_CH_ELEMENT = r"""concat('"', replaceAll(replaceAll(replaceAll(x, '\\', '\\\\'), '"', '\\"'), '\t', '\\t'), '"')"""
_CH_TEXT_ARRAY = "concat('{{', arrayStringConcat(arrayMap(x -> " + _CH_ELEMENT + ", {v}), ','), '}}')"

# The mirror's jsonb text is Python's json.dumps (sorted keys, compact): only its floats, spelled by repr ("1.0",
# "1e+16", "1.5e-07", "-0.0"), differ from the canonical spelling. The text is cut into string, number and other
# tokens, and each float token is rewritten as its exact decimal: its digits with the point moved by the exponent,
# then zeros trimmed. Nested single-element arrayMaps bind names, as ClickHouse SQL has no local variables.
_CH_JSON_TOKENS = r"""'(?s)"(?:[^"\\\\]|\\\\.)*"|-?[0-9][0-9.eE+-]*|[^"0-9-]+'"""
_CH_JSON_FLOAT = r"""arrayMap((negative, mantissa, exponent) ->
    arrayMap((digits, point) ->
        arrayMap((whole, fraction) ->
            if(whole = '' AND fraction = '', '0',
               concat(if(negative, '-', ''), if(whole = '', '0', whole), if(fraction = '', '', concat('.', fraction)))),
            [trim(LEADING '0' FROM concat(substring(digits, 1, greatest(point, 0)),
                                          repeat('0', toUInt32(greatest(point - length(digits), 0)))))],
            [trim(TRAILING '0' FROM concat(repeat('0', toUInt32(greatest(-point, 0))),
                                           substring(digits, greatest(point, 0) + 1)))])[1],
        [replaceOne(mantissa, '.', '')],
        [toInt32(position(concat(mantissa, '.'), '.')) - 1 + exponent])[1],
    [startsWith(token, '-')],
    [splitByChar('e', lower(trim(LEADING '-' FROM token)))[1]],
    [toInt32OrZero(splitByChar('e', lower(token))[2])])[1]"""
_CH_JSON = (
    "if(match({v}, '[0-9][.eE]'), arrayStringConcat(arrayMap(token -> if(match(token, '^-?[0-9]+[.eE]'), "
    + _CH_JSON_FLOAT.replace("{", "{{").replace("}", "}}")
    + ", token), extractAll({v}, "
    + _CH_JSON_TOKENS
    + "))), {v})"
)


def _clickhouse_spelling(column: Column) -> Callable[[str], str]:
    template = {
        "text": _CH_TEXT,
        "int": "toString({v})",
        "bigint": "toString({v})",
        "bool": "if({v}, 't', 'f')",
        "numeric": "toDecimalString({v}, {scale})",
        # %f prints the DateTime64's own six fraction digits, also before 1970.
        "timestamptz": "formatDateTime({v}, '%Y-%m-%dT%H:%i:%S.%fZ', 'UTC')",
        "text[]": _CH_TEXT_ARRAY,
        "jsonb": _CH_JSON,
    }[column.type]

    def spell(value: str) -> str:
        expression = template.format(v=value, scale=column.scale or 0)
        return f"ifNull({expression}, '\\\\N')" if column.nullable else expression

    return spell


CH_KEY_TYPES = {"text": "String", "int": "Int32", "bigint": "Int64"}


def backtick(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# ---------------------------------------------------------------------------------------------------------------
# Per-table plans, built once: the hot paths never look at the catalog.


@dataclass(frozen=True)
class _Field:
    column: Column
    python: Callable[[Any], str]
    es_read: Callable[[Any], Any]
    # None in a NOT NULL jsonb column is the JSON value null, as in the transform.
    none_is_json_null: bool
    derived: DerivedField | None = None  # computed from other tables, not a column of the row


@dataclass(frozen=True)
class _Plan:
    table: SyncedTable
    target: Target
    fields: tuple[_Field, ...]  # the row's columns, then the derived fields
    columns: tuple[_Field, ...]
    derived: tuple[_Field, ...]
    names: tuple[str, ...]  # PostgreSQL column names (derived: document names), in order
    targets: tuple[str, ...]  # ClickHouse / Elasticsearch names, in order


def _field(column: Column, derived: DerivedField | None = None) -> _Field:
    return _Field(
        column, _python_spelling(column), _es_reader(column), column.type == "jsonb" and not column.nullable, derived
    )


_PLANS: dict[tuple[int, str], _Plan] = {}


def _plan(table: SyncedTable, target: Target = "clickhouse") -> _Plan:
    # Keyed by id(), as in transform: hashing a SyncedTable hashes all its columns. The plan keeps the table alive.
    plan = _PLANS.get((id(table), target))
    if plan is not None and plan.table is table:
        return plan
    if target not in ("clickhouse", "elasticsearch"):
        raise ValueError(f"target must be 'clickhouse' or 'elasticsearch', got {target!r}")
    columns = tuple(_field(c) for c in table.columns if target == "clickhouse" or c.in_elasticsearch)
    # Mirrors hold only the table's own columns; a search document also shows what it derives from other tables.
    derived = tuple(_field(d.column, d) for d in table.derived) if target == "elasticsearch" else ()
    fields = (*columns, *derived)
    plan = _Plan(
        table=table,
        target=target,
        fields=fields,
        columns=columns,
        derived=derived,
        names=tuple(f.column.name for f in fields),
        targets=tuple(f.column.target_name for f in fields),
    )
    _PLANS[(id(table), target)] = plan
    return plan


def _spell(field: _Field, value: Any) -> str:
    if value is None:
        return "null" if field.none_is_json_null else NULL
    return field.python(value)


# ---------------------------------------------------------------------------------------------------------------
# Python


def column_names(table: SyncedTable, target: Target = "clickhouse") -> list[str]:
    """The PostgreSQL names of the columns a canonical string holds, in its order (then the derived fields'
    document names, for a search document)."""
    return list(_plan(table, target).names)


def derived_fields(table: SyncedTable, target: Target = "elasticsearch") -> tuple[DerivedField, ...]:
    """The derived fields a canonical row of `table` for `target` holds, in its order (none for a mirror)."""
    return tuple(f.derived for f in _plan(table, target).derived if f.derived is not None)


def canonical_from_row(
    table: SyncedTable,
    row: Mapping[str, Any],
    *,
    target: Target = "clickhouse",
    enrichment: Mapping[str, Any] | None = None,
) -> str:
    """The canonical string of a row keyed by PostgreSQL column name, Python-typed as psycopg or
    `debezium.decode_row` give it. For a search document, the derived fields come from `enrichment` (as
    `to_es_document` takes it), or from `row` itself when it is an enriched row. Raises KeyError for a missing
    column or derived field, TypeError/ValueError for a value of the wrong type (a bug upstream, not drift)."""
    plan = _plan(table, target)
    extra = row if enrichment is None else enrichment
    try:
        spelled = [_spell(f, row[f.column.name]) for f in plan.columns]
        if plan.derived:
            spelled += [_spell(f, extra[f.column.name]) for f in plan.derived]
        return SEPARATOR.join(spelled)
    except (TypeError, ValueError) as exc:
        # Find the column to name it; the message never holds the value (rows hold personal data).
        for f in plan.fields:
            try:
                _spell(f, (extra if f.derived else row)[f.column.name])
            except (TypeError, ValueError) as column_exc:
                raise type(exc)(f"{table.name}.{f.column.name}: {column_exc}") from None
        raise


def row_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> dict[str, Any]:
    """The row an Elasticsearch `_source` holds, keyed by PostgreSQL column name and Python-typed like a psycopg
    row: the inverse of `to_es_document` for the column fields (metadata and derived fields are ignored; see
    `enrichment_from_es_source`). Raises ValueError for a missing field or a value `to_es_document` cannot have
    written."""
    return _read_es_fields(table, source, _plan(table, "elasticsearch").columns)


def enrichment_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> dict[str, Any]:
    """The derived fields an Elasticsearch `_source` holds, Python-typed as the enriched query returns them
    (the `enrichment` of `to_es_document` and `canonical_from_row`). Raises ValueError as `row_from_es_source`."""
    return _read_es_fields(table, source, _plan(table, "elasticsearch").derived)


def _read_es_fields(table: SyncedTable, source: Mapping[str, Any], fields: Iterable[_Field]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for field in fields:
        column = field.column
        if column.target_name not in source:
            raise ValueError(f"{table.name}.{column.name}: field {column.target_name!r} missing from the document")
        value = source[column.target_name]
        if value is None:
            if not (column.nullable or field.none_is_json_null):
                raise ValueError(f"{table.name}.{column.name}: null in a NOT NULL column")
            row[column.name] = None
            continue
        try:
            row[column.name] = field.es_read(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{table.name}.{column.name}: {exc}") from None
    return row


def _es_field(field: _Field, source: Mapping[str, Any]) -> str:
    column = field.column
    value = source.get(column.target_name, _MISSING)
    if value is _MISSING:
        return INVALID
    if value is None:
        if column.nullable or field.none_is_json_null:
            return _spell(field, None)
        return INVALID
    try:
        return field.python(field.es_read(value))
    except (TypeError, ValueError, RecursionError):
        return INVALID


def canonical_from_es_source(table: SyncedTable, source: Mapping[str, Any]) -> str:
    """The canonical string of an Elasticsearch `_source` (columns marked `in_elasticsearch`, then the derived
    fields). Never raises for a bad value: a field `to_es_document` cannot have written (hand-edited, missing) is `\\!`, so the document
    shows as different instead of aborting its segment."""
    return SEPARATOR.join([_es_field(f, source) for f in _plan(table, "elasticsearch").fields])


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


def python_segment_checksum(
    table: SyncedTable,
    rows_or_sources: Iterable[Mapping[str, Any]],
    *,
    es_sources: bool = False,
    target: Target = "clickhouse",
) -> tuple[int, int]:
    """(count, sum of row_hash) over Python rows, or over Elasticsearch `_source`s with `es_sources=True` (then
    tombstones, `is_deleted: true`, are skipped and the columns are the document's). The caller chooses the
    rows of the segment."""
    count = total = 0
    if es_sources:
        for source in rows_or_sources:
            if source.get(ES_DELETED_FIELD) is True:
                continue
            count += 1
            total += row_hash(canonical_from_es_source(table, source))
    else:
        for row in rows_or_sources:
            count += 1
            total += row_hash(canonical_from_row(table, row, target=target))
    return count, total


def es_source_fields(table: SyncedTable) -> list[str]:
    """The `_source` fields a canonical row reads (pass as `_source_includes`), plus the tombstone flag."""
    return [*_plan(table, "elasticsearch").targets, ES_DELETED_FIELD]


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
# Key segments


def segment_parameters(table: SyncedTable, lo: Any = None, hi: Any = None) -> dict[str, Any]:
    """Query parameters for the segment [lo, hi): `lo_0`, `hi_0`, ... per key column. A bound is the key value
    (a tuple for a composite key) or None for no bound, matching the `lower_bound`/`upper_bound` of the query."""
    params: dict[str, Any] = {}
    for prefix, bound in (("lo", lo), ("hi", hi)):
        if bound is None:
            continue
        values = bound if isinstance(bound, tuple) else (bound,)
        if len(values) != len(table.key):
            raise ValueError(f"{table.name}: a key has {len(table.key)} values, the bound has {len(values)}")
        params.update({f"{prefix}_{i}": v for i, v in enumerate(values)})
    return params


def _key_columns(table: SyncedTable) -> list[Column]:
    columns = [table.column(k) for k in table.key]
    for c in columns:
        if c.type not in PG_KEY_TYPES:
            raise ValueError(f"{table.name}.{c.name}: key segments support text and integer keys, not {c.type}")
    return columns


def postgres_key_range(table: SyncedTable, alias: str, lower_bound: bool, upper_bound: bool) -> sql.Composable:
    columns = _key_columns(table)
    # COLLATE "C": compare text keys by their UTF-8 bytes, as ClickHouse and Elasticsearch do, whatever the
    # database's collation; otherwise a segment would not hold the same keys in every store.
    keys = [
        sql.SQL('{} COLLATE "C"' if c.type == "text" else "{}").format(sql.Identifier(alias, c.name)) for c in columns
    ]

    def bound(prefix: str) -> sql.Composable:
        values = [
            sql.SQL("{}::{}").format(sql.Placeholder(f"{prefix}_{i}"), sql.SQL(PG_KEY_TYPES[c.type]))
            for i, c in enumerate(columns)
        ]
        return values[0] if len(values) == 1 else sql.SQL("ROW({})").format(sql.SQL(", ").join(values))

    key = keys[0] if len(keys) == 1 else sql.SQL("ROW({})").format(sql.SQL(", ").join(keys))
    conditions: list[sql.Composable] = []
    if lower_bound:
        conditions.append(sql.SQL("{} >= {}").format(key, bound("lo")))
    if upper_bound:
        conditions.append(sql.SQL("{} < {}").format(key, bound("hi")))
    return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")


def clickhouse_key_range(table: SyncedTable, lower_bound: bool, upper_bound: bool) -> str:
    columns = _key_columns(table)
    names = [backtick(c.target_name) for c in columns]
    key = names[0] if len(names) == 1 else f"tuple({', '.join(names)})"

    def bound(prefix: str) -> str:
        values = [f"{{{prefix}_{i}:{CH_KEY_TYPES[c.type]}}}" for i, c in enumerate(columns)]
        return values[0] if len(values) == 1 else f"tuple({', '.join(values)})"

    conditions = [f"{backtick(CLICKHOUSE_DELETED_COLUMN)} = 0"]
    if lower_bound:
        conditions.append(f"{key} >= {bound('lo')}")
    if upper_bound:
        conditions.append(f"{key} < {bound('hi')}")
    return " AND ".join(conditions)


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL


# Relations standing in for the tables derived fields are computed from, by table name (scratch copies in tests).
Sources = Mapping[str, sql.Composable]


def postgres_derived_sql(field: DerivedField, alias: str = "t", *, sources: Sources | None = None) -> sql.Composed:
    """The catalog's definition of `field` as an expression for the row `alias`: `{row}` becomes the alias, a
    source table's name the table (or its stand-in from `sources`), any other name a quoted identifier."""
    values: dict[str, sql.Composable] = {}
    for _, name, _, _ in string.Formatter().parse(field.sql):
        if name is None or name in values:
            continue
        if name == "row":
            values[name] = sql.Identifier(alias)
        elif name in field.sources:
            source = catalog_table(name)
            values[name] = (sources or {}).get(name) or sql.Identifier(source.schema, source.name)
        else:
            values[name] = sql.Identifier(name)
    return sql.SQL(field.sql).format(**values)


def postgres_canonical_sql(
    table: SyncedTable, alias: str = "t", *, target: Target = "clickhouse", sources: Sources | None = None
) -> sql.Composed:
    """An expression for the canonical string of the row `alias` (a row of `table`, or of a table shaped like it).
    For a search document the derived fields are computed from their source tables by the catalog's definition."""
    fields = [
        _postgres_spelling(f.column)(
            sql.Identifier(alias, f.column.name)
            if f.derived is None
            else postgres_derived_sql(f.derived, alias, sources=sources)
        )
        for f in _plan(table, target).fields
    ]
    return sql.Composed([sql.SQL("("), _PG_SEPARATOR.join(fields), sql.SQL(")")])


def postgres_hash_sql(
    table: SyncedTable, alias: str = "t", *, target: Target = "clickhouse", sources: Sources | None = None
) -> sql.Composed:
    """An expression for `row_hash` of the row `alias`, as bigint."""
    return sql.SQL("('x' || right(md5({}), 15))::bit(60)::bigint").format(
        postgres_canonical_sql(table, alias, target=target, sources=sources)
    )


def _relation(table: SyncedTable, relation: sql.Composable | None) -> sql.Composable:
    return relation if relation is not None else sql.Identifier(table.schema, table.name)


def postgres_segment_checksum_sql(
    table: SyncedTable,
    *,
    relation: sql.Composable | None = None,
    target: Target = "clickhouse",
    sources: Sources | None = None,
    lower_bound: bool = True,
    upper_bound: bool = True,
) -> sql.Composed:
    """`SELECT row_count, checksum` (count and numeric sum of `row_hash`) over the rows whose key is in
    [%(lo_0)s, %(hi_0)s); parameters from `segment_parameters`. `relation` replaces the table (a scratch copy),
    `sources` the tables derived fields come from."""
    return sql.SQL(
        "SELECT count(*) AS row_count, coalesce(sum({hash}), 0) AS checksum FROM {rel} AS t WHERE {range}"
    ).format(
        hash=postgres_hash_sql(table, "t", target=target, sources=sources),
        rel=_relation(table, relation),
        range=postgres_key_range(table, "t", lower_bound, upper_bound),
    )


def postgres_segment_rows_sql(
    table: SyncedTable,
    *,
    relation: sql.Composable | None = None,
    target: Target = "clickhouse",
    sources: Sources | None = None,
    lower_bound: bool = True,
    upper_bound: bool = True,
) -> sql.Composed:
    """The key columns, `canonical` and `row_hash` of every row in the segment, in key order (bytes for text)."""
    keys = [
        sql.SQL('{} COLLATE "C"' if table.column(k).type == "text" else "{}").format(sql.Identifier("t", k))
        for k in table.key
    ]
    return sql.SQL(
        "SELECT {keys}, {canonical} AS canonical, {hash} AS row_hash FROM {rel} AS t WHERE {range} ORDER BY {order}"
    ).format(
        keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in table.key),
        canonical=postgres_canonical_sql(table, "t", target=target, sources=sources),
        hash=postgres_hash_sql(table, "t", target=target, sources=sources),
        rel=_relation(table, relation),
        range=postgres_key_range(table, "t", lower_bound, upper_bound),
        order=sql.SQL(", ").join(keys),
    )


def postgres_segment_checksum(
    conn: psycopg.Connection,
    table: SyncedTable,
    lo: Any = None,
    hi: Any = None,
    *,
    relation: sql.Composable | None = None,
    target: Target = "clickhouse",
    sources: Sources | None = None,
) -> tuple[int, int]:
    """(count, sum of row_hash) of the rows with key in [lo, hi), computed inside PostgreSQL."""
    query = postgres_segment_checksum_sql(
        table,
        relation=relation,
        target=target,
        sources=sources,
        lower_bound=lo is not None,
        upper_bound=hi is not None,
    )
    row = conn.execute(query, segment_parameters(table, lo, hi)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------------------------------------------------------
# ClickHouse


def clickhouse_canonical_sql(table: SyncedTable) -> str:
    """An expression for the canonical string of a mirror row, over the mirror's (unqualified) columns."""
    fields = [_clickhouse_spelling(f.column)(backtick(f.column.target_name)) for f in _plan(table).fields]
    return "concat(" + ", '\\t', ".join(fields) + ")"


def clickhouse_hash_sql(table: SyncedTable) -> str:
    """An expression for `row_hash` of a mirror row, as UInt64: the last 8 MD5 bytes, big-endian, low 60 bits."""
    return f"bitAnd(reinterpretAsUInt64(reverse(substring(MD5({clickhouse_canonical_sql(table)}), 9, 8))), {HASH_MASK})"


def _mirror(table: SyncedTable, database: str) -> str:
    return f"{backtick(database)}.{backtick(table.clickhouse_table)}"


def clickhouse_segment_checksum_sql(
    table: SyncedTable,
    *,
    database: str = CLICKHOUSE_DATABASE,
    lower_bound: bool = True,
    upper_bound: bool = True,
) -> str:
    """`SELECT row_count, checksum` over the live mirror rows (FINAL, not deleted) whose key is in
    [{lo_0:T}, {hi_0:T}): server-side parameters from `segment_parameters`. The sum is UInt128: it cannot wrap."""
    return (
        f"SELECT count() AS row_count, sum(toUInt128({clickhouse_hash_sql(table)})) AS checksum "
        f"FROM {_mirror(table, database)} FINAL WHERE {clickhouse_key_range(table, lower_bound, upper_bound)}"
    )


def clickhouse_segment_rows_sql(
    table: SyncedTable,
    *,
    database: str = CLICKHOUSE_DATABASE,
    lower_bound: bool = True,
    upper_bound: bool = True,
) -> str:
    """The key columns, `canonical` and `row_hash` of every live mirror row in the segment, in key order."""
    keys = ", ".join(backtick(table.column(k).target_name) for k in table.key)
    return (
        f"SELECT {keys}, {clickhouse_canonical_sql(table)} AS canonical, {clickhouse_hash_sql(table)} AS row_hash "
        f"FROM {_mirror(table, database)} FINAL WHERE {clickhouse_key_range(table, lower_bound, upper_bound)} "
        f"ORDER BY {keys}"
    )


def clickhouse_segment_checksum(
    client: ClickHouseClient,
    table: SyncedTable,
    lo: Any = None,
    hi: Any = None,
    *,
    database: str = CLICKHOUSE_DATABASE,
) -> tuple[int, int]:
    """(count, sum of row_hash) of the live mirror rows with key in [lo, hi), computed inside ClickHouse."""
    query = clickhouse_segment_checksum_sql(
        table, database=database, lower_bound=lo is not None, upper_bound=hi is not None
    )
    row = client.query(query, parameters=segment_parameters(table, lo, hi)).result_rows[0]
    return int(row[0]), int(row[1])


def key_of(table: SyncedTable, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The key of a Python row (PostgreSQL column names), as a tuple in `table.key` order."""
    return tuple(row[k] for k in table.key)


def key_of_source(table: SyncedTable, source: Mapping[str, Any]) -> tuple[Any, ...]:
    """The key of an Elasticsearch `_source`, as a tuple in `table.key` order."""
    return tuple(source[table.column(k).target_name] for k in table.key)
