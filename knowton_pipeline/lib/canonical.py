"""Canonical rows and their hashes, the store-neutral rules of reconciliation (docs/architecture.md).

A row's canonical string is spelled identically by PostgreSQL SQL, by ClickHouse SQL over the mirror and by Python
(over a row or an Elasticsearch `_source`); this module holds the rules and the Python spelling, and each store's
module in `lib/stores/` spells them in its own language. Per key segment each store returns the row count and the
sum of `row_hash` over its rows, so only mismatching segments need to travel.

What a canonical row covers is its **shape**: a `mirror` holds every catalog column; a `document` (a search
document) holds the columns marked `in_elasticsearch`, then the table's derived fields (`SyncedTable.derived`, in
declaration order), which PostgreSQL computes by the catalog's definition, Python takes from the enrichment and
a search index stores. Each field:
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Context, Decimal
from operator import itemgetter
from typing import Any, Literal

import orjson

from knowton_pipeline.catalog import Column, DerivedField, SyncedTable
from knowton_pipeline.lib.transform import ORJSON_PLAIN_FLOATS, decimal_text, format_timestamp, json_floats_all

SEPARATOR = "\t"
NULL = "\\N"
# Only Python over an Elasticsearch `_source` writes it: a field that no column value could produce.
INVALID = "\\!"
HASH_BITS = 60
HASH_MASK = (1 << HASH_BITS) - 1

# Which columns a canonical row covers: a mirror holds every catalog column, a search document the columns marked
# `in_elasticsearch` and its derived fields. A target store declares its shape; PostgreSQL spells either.
Shape = Literal["mirror", "document"]
SHAPES: tuple[Shape, ...] = ("mirror", "document")
# Key column types a key segment can be bounded by, in every store.
KEY_TYPES = ("text", "int", "bigint")

_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring
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
    """A JSON value (as json.loads returns it) as canonical JSON text; see the module docstring.

    orjson writes the usual value (`_spelled_json` is the definition: tests hold the two equal): its sorted keys,
    separators and string escapes are the canonical ones, and so are its integers and the floats it spells as
    their exact decimal (a fraction, from 1e-4 up to 1e16)."""
    if json_floats_all(value, _spelled_exactly):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:  # an integer beyond 64 bits, a key that is not a string: the definition decides
            pass
    return _spelled_json(value)


def _spelled_exactly(number: float) -> bool:
    """Whether orjson writes `number` as its exact decimal (a fraction in its plain range)."""
    return ORJSON_PLAIN_FLOATS[0] <= abs(number) < ORJSON_PLAIN_FLOATS[1] and not number.is_integer()


def _spelled_json(value: Any) -> str:
    """The definition of `canonical_json_value`."""
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
        return "{" + ",".join(_encode_json_string(k) + ":" + _spelled_json(v) for k, v in members) + "}"
    if kind is list or kind is tuple:
        return "[" + ",".join(_spelled_json(v) for v in value) + "]"
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


# ---------------------------------------------------------------------------------------------------------------
# Per-table plans, built once: the hot paths never look at the catalog.


@dataclass(frozen=True)
class Field:
    column: Column
    python: Callable[[Any], str]
    # None in a NOT NULL jsonb column is the JSON value null, as in the transform.
    none_is_json_null: bool
    derived: DerivedField | None = None  # computed from other tables, not a column of the row


@dataclass(frozen=True)
class Plan:
    table: SyncedTable
    shape: Shape
    fields: tuple[Field, ...]  # the row's columns, then the derived fields
    columns: tuple[Field, ...]
    derived: tuple[Field, ...]
    names: tuple[str, ...]  # PostgreSQL column names (derived: document names), in order
    targets: tuple[str, ...]  # the stores' (snake_case) names, in order


def _field(column: Column, derived: DerivedField | None = None) -> Field:
    return Field(column, _python_spelling(column), column.type == "jsonb" and not column.nullable, derived)


_PLANS: dict[tuple[int, str], Plan] = {}


def plan(table: SyncedTable, shape: Shape = "mirror") -> Plan:
    """The fields a canonical row of `table` in `shape` holds, in order."""
    # Keyed by id(), as in transform: hashing a SyncedTable hashes all its columns. The plan keeps the table alive.
    found = _PLANS.get((id(table), shape))
    if found is not None and found.table is table:
        return found
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    columns = tuple(_field(c) for c in table.columns if shape == "mirror" or c.in_elasticsearch)
    # Mirrors hold only the table's own columns; a search document also shows what it derives from other tables.
    derived = tuple(_field(d.column, d) for d in table.derived) if shape == "document" else ()
    fields = (*columns, *derived)
    made = Plan(
        table=table,
        shape=shape,
        fields=fields,
        columns=columns,
        derived=derived,
        names=tuple(f.column.name for f in fields),
        targets=tuple(f.column.target_name for f in fields),
    )
    _PLANS[(id(table), shape)] = made
    return made


def spell(field: Field, value: Any) -> str:
    """The canonical text of one field's value."""
    if value is None:
        return "null" if field.none_is_json_null else NULL
    return field.python(value)


# ---------------------------------------------------------------------------------------------------------------
# Python


def column_names(table: SyncedTable, shape: Shape = "mirror") -> list[str]:
    """The PostgreSQL names of the columns a canonical string holds, in its order (then the derived fields'
    document names, for a search document)."""
    return list(plan(table, shape).names)


def canonical_from_row(
    table: SyncedTable,
    row: Mapping[str, Any],
    *,
    shape: Shape = "mirror",
    enrichment: Mapping[str, Any] | None = None,
) -> str:
    """The canonical string of a row keyed by PostgreSQL column name, Python-typed as psycopg or
    `debezium.decode_row` give it. For a search document, the derived fields come from `enrichment` (as
    `to_es_document` takes it), or from `row` itself when it is an enriched row. Raises KeyError for a missing
    column or derived field, TypeError/ValueError for a value of the wrong type (a bug upstream, not drift)."""
    fields = plan(table, shape)
    extra = row if enrichment is None else enrichment
    try:
        spelled = [spell(f, row[f.column.name]) for f in fields.columns]
        if fields.derived:
            spelled += [spell(f, extra[f.column.name]) for f in fields.derived]
        return SEPARATOR.join(spelled)
    except (TypeError, ValueError) as exc:
        # Find the column to name it; the message never holds the value (rows hold personal data).
        for f in fields.fields:
            try:
                spell(f, (extra if f.derived else row)[f.column.name])
            except (TypeError, ValueError) as column_exc:
                raise type(exc)(f"{table.name}.{f.column.name}: {column_exc}") from None
        raise


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


def key_columns(table: SyncedTable) -> list[Column]:
    """The key columns of `table`, refusing a type key segments cannot be bounded by in every store."""
    columns = [table.column(k) for k in table.key]
    for c in columns:
        if c.type not in KEY_TYPES:
            raise ValueError(f"{table.name}.{c.name}: key segments support text and integer keys, not {c.type}")
    return columns
