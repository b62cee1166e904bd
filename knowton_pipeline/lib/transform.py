"""The one transform per target (docs/architecture.md, "Where things live"): a PostgreSQL row becomes a
ClickHouse mirror row or an Elasticsearch document here, whether it came from the CDC stream, a backfill or a
DLQ replay.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation
from functools import cache
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from knowton_pipeline.catalog import Column, SyncedTable

if TYPE_CHECKING:
    from knowton_pipeline.lib.debezium import ChangeColumns

CLICKHOUSE_VERSION_COLUMN = "version"
CLICKHOUSE_DELETED_COLUMN = "is_deleted"
ES_VERSION_FIELD = "pg_lsn"
ES_DELETED_FIELD = "is_deleted"
ES_INDEXED_AT_FIELD = "indexed_at"
ES_METADATA_FIELDS = (ES_VERSION_FIELD, ES_DELETED_FIELD, ES_INDEXED_AT_FIELD)
# Separates the values of a composite key in an Elasticsearch _id.
DOCUMENT_ID_SEPARATOR = "|"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# PostgreSQL caps a declared numeric precision at 1000 digits; trapping InvalidOperation makes a value
# with an absurd exponent fail instead of being rounded.
_DECIMAL_CONTEXT = Context(prec=1000, traps=[InvalidOperation])
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MISSING: Any = object()


# ---------------------------------------------------------------------------------------------------------------
# Value formats shared by every target (and by the Debezium codec), so there is one spelling of each.


@cache
def _quantum(scale: int) -> Decimal:
    return Decimal(1).scaleb(-scale)


def exact_decimal(value: Decimal | int | str, scale: int) -> Decimal:
    """`value` with exactly `scale` digits after the point; ValueError if that would change its value.

    Floats are refused (`TypeError`): they cannot carry 5.10 exactly. Negative zero becomes zero, as in
    PostgreSQL's numeric, so "-0.00" can never hash differently from "0.00".
    """
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        if not _DECIMAL_TEXT.fullmatch(value):
            raise ValueError("not a finite decimal number")
        number = Decimal(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    else:
        raise TypeError(f"expected a Decimal, int or decimal string, got {type(value).__name__}")
    if not number.is_finite():
        raise ValueError("not a finite decimal number")
    try:
        exact = number.quantize(_quantum(scale), context=_DECIMAL_CONTEXT)
    except InvalidOperation:
        raise ValueError("has too many digits") from None
    if exact != number:
        raise ValueError(f"has more than {scale} digits after the point")
    return exact.copy_abs() if exact.is_zero() else exact


def decimal_text(value: Decimal | int | str, scale: int) -> str:
    """The exact decimal as PostgreSQL prints numeric(p, scale): plain digits, `scale` of them after the point."""
    return format(exact_decimal(value, scale), "f")


def utc_datetime(value: datetime) -> datetime:
    """A timezone-aware datetime moved to UTC; naive datetimes are refused, their instant is unknowable."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    offset = value.utcoffset()
    if offset is None:
        raise ValueError("naive datetime: a timestamptz needs a timezone")
    if value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with exactly six fraction digits and "Z": `2026-11-24T05:05:32.487591Z`."""
    # isoformat pads the year to four digits and, told to, keeps a zero fraction; in UTC it ends in "+00:00".
    return utc_datetime(value).isoformat(timespec="microseconds")[:26] + "Z"


def canonical_json(value: Any) -> str:
    """jsonb as canonical JSON text: sorted keys, no spaces, UTF-8 kept, NaN and Infinity refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# orjson writes a float as Python's repr does from 1e-4 up to 1e16 (plain digits; checked in lib/test_transform.py).
# Outside, repr writes an exponent and orjson a different one.
ORJSON_PLAIN_FLOATS = (1e-4, 1e16)
_JSON_SCALARS = (str, int, bool, type(None))


def json_floats_all(value: Any, accept: Callable[[float], bool]) -> bool:
    """Whether `value` holds only what json.loads returns (dict, list, str, int, float, bool, None) and every float
    in it is accepted."""
    kind = type(value)
    if kind is dict:
        return all(type(v) in _JSON_SCALARS or json_floats_all(v, accept) for v in value.values())
    if kind is list:
        return all(type(v) in _JSON_SCALARS or json_floats_all(v, accept) for v in value)
    if kind is float:
        return accept(value)
    return kind in _JSON_SCALARS


def plain_float(number: float) -> bool:
    """Whether orjson reads and writes `number` as json does: zero, or a magnitude from 1e-4 up to 1e16."""
    return number == 0 or ORJSON_PLAIN_FLOATS[0] <= abs(number) < ORJSON_PLAIN_FLOATS[1]


def canonical_json_text(text: bytes) -> str:
    """`canonical_json(json.loads(text))`: jsonb text (as PostgreSQL prints it) as the mirror's canonical JSON.

    orjson reads and writes the usual value: its sorted keys, separators, string escapes and the floats it spells
    like repr are json.dumps's, and it reads numbers as json does (`lib/test_transform.py` holds them equal). json
    does the rest: a float outside orjson's plain range (which takes in every integer beyond 64 bits: orjson reads
    those as floats of 9.2e18 or more) and what orjson does not read. ValueError as `canonical_json` raises it (not
    JSON, NaN or an infinity)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    else:
        if json_floats_all(value, plain_float):
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return canonical_json(json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# Per-type conversions. They check types cheaply: a wrong type is a bug upstream and is better named here, with
# its column, than as an opaque error from the store. Messages never contain values (rows hold personal data).


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


def _integer(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected int, got {type(value).__name__}")
    return value


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return value


def _text_array(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(type(v) is str for v in value):
        raise TypeError(f"expected a list of str, got {type(value).__name__}")
    return list(value)


def _jsonb_value(value: Any) -> Any:
    # A number beyond a double reads as an infinity, which JSON cannot carry (orjson would write null in its place):
    # refused, as the mirror's canonical JSON refuses it.
    if not json_floats_all(value, math.isfinite):
        raise ValueError("a number in the JSON is beyond a double's range, or not JSON")
    return value


def _numeric_for(scale: int) -> Callable[[Any], Decimal]:
    def convert(value: Any) -> Decimal:
        return exact_decimal(value, scale)

    return convert


def _numeric_text_for(scale: int) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        return decimal_text(value, scale)

    return convert


def _neutral(column: Column) -> Callable[[], Any]:
    """Stand-in for a NOT NULL column a delete did not carry; the mirror hides deleted rows, so it is never read."""
    neutrals: dict[str, Callable[[], Any]] = {
        "text": lambda: "",
        "int": lambda: 0,
        "bigint": lambda: 0,
        "bool": lambda: False,
        "numeric": lambda: Decimal(0).scaleb(-(column.scale or 0)),
        "timestamptz": lambda: EPOCH,
        "text[]": list,
        "jsonb": lambda: "{}",
    }
    return neutrals[column.type]


def _clickhouse_converter(column: Column) -> Callable[[Any], Any]:
    return {
        "text": _text,
        "int": _integer,
        "bigint": _integer,
        "bool": _boolean,
        "numeric": _numeric_for(column.scale or 0),
        "timestamptz": utc_datetime,
        "text[]": _text_array,
        "jsonb": canonical_json,
    }[column.type]


def _es_converter(column: Column) -> Callable[[Any], Any]:
    # numeric travels as an exact string: Elasticsearch keeps _source as sent while indexing it as a double.
    return {
        "text": _text,
        "int": _integer,
        "bigint": _integer,
        "bool": _boolean,
        "numeric": _numeric_text_for(column.scale or 0),
        "timestamptz": format_timestamp,
        "text[]": _text_array,
        "jsonb": _jsonb_value,
    }[column.type]


# ---------------------------------------------------------------------------------------------------------------
# Column plans, built once per table so the hot path never scans the catalog.


@dataclass(frozen=True)
class _ColumnPlan:
    name: str
    target: str
    nullable: bool
    is_key: bool
    to_clickhouse: Callable[[Any], Any]
    to_es: Callable[[Any], Any]
    neutral: Callable[[], Any]
    # None in a NOT NULL jsonb column can only be JSON null ('null'::jsonb), which psycopg and the decoder both
    # load as None: a value, not a NULL.
    json_null: bool


@dataclass(frozen=True)
class _TablePlan:
    table: SyncedTable
    columns: tuple[_ColumnPlan, ...]
    clickhouse_columns: tuple[str, ...]
    es_columns: tuple[_ColumnPlan, ...]
    es_key_columns: tuple[_ColumnPlan, ...]
    # Names an enrichment may not use: they would silently overwrite a column or the version metadata.
    reserved_es_fields: frozenset[str]


# Keyed by id(): hashing a SyncedTable hashes every column on each call. The plan keeps its table alive, so an
# id is never reused for another table while its entry exists.
_PLANS: dict[int, _TablePlan] = {}


def _plan(table: SyncedTable) -> _TablePlan:
    plan = _PLANS.get(id(table))
    if plan is not None and plan.table is table:
        return plan
    columns = tuple(
        _ColumnPlan(
            name=c.name,
            target=c.target_name,
            nullable=c.nullable,
            is_key=c.name in table.key,
            to_clickhouse=_clickhouse_converter(c),
            to_es=_es_converter(c),
            neutral=_neutral(c),
            json_null=c.type == "jsonb" and not c.nullable,
        )
        for c in table.columns
    )
    by_name = {c.name: c for c in columns}
    unknown_keys = [k for k in table.key if k not in by_name]
    if unknown_keys:
        raise ValueError(f"{table.name}: key columns {unknown_keys} are not in its catalog columns")
    es_names = {c.name for c in table.columns if c.in_elasticsearch}
    plan = _TablePlan(
        table=table,
        columns=columns,
        clickhouse_columns=(*(c.target for c in columns), CLICKHOUSE_VERSION_COLUMN, CLICKHOUSE_DELETED_COLUMN),
        es_columns=tuple(c for c in columns if c.name in es_names),
        es_key_columns=tuple(by_name[k] for k in table.key if k in es_names),
        reserved_es_fields=frozenset({c.name for c in columns} | {c.target for c in columns} | set(ES_METADATA_FIELDS)),
    )
    _PLANS[id(table)] = plan
    return plan


def _check_version(version: int) -> None:
    if type(version) is not int or version < 0:
        raise ValueError(f"version must be a non-negative int (a PostgreSQL LSN), got {type(version).__name__}")


def _column_error(table: SyncedTable, column: _ColumnPlan, exc: Exception) -> ValueError:
    return ValueError(f"{table.name}.{column.name}: {exc}")


# ---------------------------------------------------------------------------------------------------------------
# ClickHouse


def clickhouse_columns(table: SyncedTable) -> list[str]:
    """The mirror's columns in insert order: every catalog column's target name, then `version`, `is_deleted`."""
    return list(_plan(table).clickhouse_columns)


def to_clickhouse_row(table: SyncedTable, row: Mapping[str, Any], *, version: int, deleted: bool) -> list[Any]:
    """Values in `clickhouse_columns(table)` order, as clickhouse-connect inserts them.

    `row` is keyed by PostgreSQL column name and Python-typed (as `debezium.decode_row` or psycopg return it).
    numeric stays `Decimal` at the column's scale (never a float), timestamptz a UTC-aware datetime, jsonb its
    canonical JSON text. A deleted row needs only its key columns: the others are filled with None (nullable)
    or a neutral value, since `ReplacingMergeTree(version, is_deleted)` read with FINAL never shows them.
    """
    plan = _plan(table)
    _check_version(version)
    values: list[Any] = []
    for column in plan.columns:
        value = row.get(column.name, _MISSING)
        if value is None and column.json_null:
            values.append(canonical_json(None))
            continue
        if value is _MISSING or value is None:
            if column.is_key:
                what = "is missing" if value is _MISSING else "is NULL"
                raise ValueError(f"{table.name}.{column.name}: key column {what}")
            if value is None and column.nullable:
                values.append(None)
            elif deleted:
                values.append(None if column.nullable else column.neutral())
            elif value is _MISSING:
                raise ValueError(f"{table.name}.{column.name}: column is missing from the row")
            else:
                raise ValueError(f"{table.name}.{column.name}: NULL in a NOT NULL column")
            continue
        try:
            values.append(column.to_clickhouse(value))
        except (TypeError, ValueError) as exc:
            raise _column_error(table, column, exc) from None
    values.append(version)
    values.append(1 if deleted else 0)
    return values


def clickhouse_block(changes: ChangeColumns, *, tombstones_below: int = 0) -> pa.Table:
    """The mirror rows of a batch read as columns, as one Arrow table in `clickhouse_columns` order: what
    `to_clickhouse_row` gives for the last change of each key (`sync.apply.latest_per_key`), with a live row
    versioned below `tombstones_below` (its table's newest truncate) written as a tombstone."""
    plan = _plan(changes.table)
    versions = changes.versions
    latest: dict[tuple[Any, ...], int] = {}
    for i, key in enumerate(changes.keys):
        j = latest.get(key)
        if j is None or versions[i] >= versions[j]:
            latest[key] = i
    kept = sorted(latest.values())
    rows = changes.rows.take(kept) if len(kept) < len(versions) else changes.rows
    deletes = changes.deletes
    columns = []
    for column in plan.columns:
        values = rows.column(column.name)
        if not column.nullable and values.null_count:
            # Only a delete leaves NULL here (it carries just its key): the neutral stand-in `to_clickhouse_row`
            # writes, which the mirror never shows.
            values = values.fill_null(pa.scalar(column.neutral(), type=values.type))
        columns.append(values)
    columns.append(pa.array([versions[i] for i in kept], type=pa.uint64()))
    columns.append(pa.array([1 if deletes[i] or versions[i] < tombstones_below else 0 for i in kept], type=pa.uint8()))
    return pa.Table.from_arrays(columns, names=list(plan.clickhouse_columns))


# ---------------------------------------------------------------------------------------------------------------
# Elasticsearch


def document_id(table: SyncedTable, key: Sequence[Any]) -> str:
    """The Elasticsearch `_id`: the key value as text, or a composite key's values joined with "|"."""
    if len(key) != len(table.key):
        raise ValueError(f"{table.name}: key has {len(key)} values, the table's key has {len(table.key)} columns")
    if len(key) == 1:
        return str(key[0])
    parts = [str(v) for v in key]
    if any(DOCUMENT_ID_SEPARATOR in p for p in parts):
        # Two different keys would share an _id and overwrite each other.
        raise ValueError(f"{table.name}: a composite key value contains {DOCUMENT_ID_SEPARATOR!r}")
    return DOCUMENT_ID_SEPARATOR.join(parts)


def to_es_document(
    table: SyncedTable,
    row: Mapping[str, Any],
    *,
    version: int,
    deleted: bool,
    indexed_at: datetime,
    enrichment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The document's `_source`: the row's Elasticsearch columns by target name, plus `pg_lsn`, `is_deleted` and
    `indexed_at`.

    numeric becomes an exact decimal string ("5.00"), timestamptz ISO 8601 UTC with six fraction digits and "Z",
    jsonb its Python value. A deleted row becomes a versioned tombstone: only the key fields and the metadata
    (enrichment is dropped), which the search alias filters out. `enrichment` fields are added verbatim and
    may not reuse a column's or the metadata's name.
    """
    plan = _plan(table)
    if table.elasticsearch_index is None:
        raise ValueError(f"{table.name} has no Elasticsearch index")
    _check_version(version)
    if enrichment:
        clashes = plan.reserved_es_fields.intersection(enrichment)
        if clashes:
            raise ValueError(f"{table.name}: enrichment fields {sorted(clashes)} clash with column or metadata names")
    document: dict[str, Any] = {}
    for column in plan.es_key_columns if deleted else plan.es_columns:
        value = row.get(column.name, _MISSING)
        if value is _MISSING:
            raise ValueError(f"{table.name}.{column.name}: column is missing from the row")
        if value is None:
            if not (column.nullable or column.json_null):
                raise ValueError(f"{table.name}.{column.name}: NULL in a NOT NULL column")
            document[column.target] = None
            continue
        try:
            document[column.target] = column.to_es(value)
        except (TypeError, ValueError) as exc:
            raise _column_error(table, column, exc) from None
    if enrichment and not deleted:
        document.update(enrichment)
    document[ES_VERSION_FIELD] = version
    document[ES_DELETED_FIELD] = deleted
    document[ES_INDEXED_AT_FIELD] = format_timestamp(indexed_at)
    return document
