"""Decode Debezium change events from the `cdc-<Table>` topics into typed rows: the one place that knows how the
connector encodes values (JsonConverter without schemas, decimals as strings, timestamps as ISO-8601 strings).
"""

from __future__ import annotations

import json
import keyword
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from operator import attrgetter
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from knowton_pipeline.catalog import TOPIC_PREFIX, Column, SyncedTable, UnknownTableError
from knowton_pipeline.catalog import table as catalog_table
from knowton_pipeline.lib.transform import decimal_text, exact_decimal, format_timestamp
from knowton_pipeline.lib.versions import (
    MAX_VERSION,
    sequence_position,
    stream_version,
    stream_versions,
    stream_versions_of,
)

try:  # the compiled reading of a batch (`_columns.c`); without it, batches are read with msgspec alone
    from knowton_pipeline.lib import _columns
except ImportError:  # pragma: no cover - a build without a C compiler
    _columns = None  # type: ignore[assignment]

OPS = ("c", "u", "d", "r", "t")
_R = TypeVar("_R")
log = logging.getLogger(__name__)
_MISSING: Any = object()
_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}
# Debezium's ZonedTimestamp: ISO-8601 with 0-9 fraction digits, normally "Z" (any offset is accepted).
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:(Z)|([+-])(\d{2}):(\d{2}))",
)


# Debezium's usual form, "2025-03-01T12:00:00.123456Z", which the standard parser reads exactly.
_USUAL_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", re.ASCII).fullmatch


class MalformedEventError(ValueError):
    """The record can never be applied, however often it is retried: a poison record for the DLQ.

    Messages name the table, the column or envelope field, what was expected and the JSON type that arrived,
    never a value: rows hold personal data and these messages end up in logs and DLQ headers.
    """

    def __init__(self, message: str, *, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class ChangeEvent:
    """One decoded change to one row.

    `after` is keyed by PostgreSQL column name and Python-typed, decoded whole: it is what the stores will hold.
    `before` is informative only (which content a deleted purchase counted for, whether a username changed):
    it holds just the columns that decoded, so an old value the decoder refuses (numeric NaN, a timestamp at
    infinity) or a key-only image (`REPLICA IDENTITY DEFAULT`) can never block the change. A delete applies
    from its key alone. A truncate ("t") has no key and no images: it removes every row of the table.
    `lsn` is `source.lsn`; `version`, what every write of this change carries, orders changes by commit
    (`lib/versions.py`, which defaults it to `lsn`); `ts_ms` is when PostgreSQL committed the change.
    """

    table: SyncedTable
    op: str  # "c" insert, "u" update, "d" delete, "r" snapshot read, "t" truncate
    key: tuple[Any, ...]  # typed values, in `table.key` order; () for a truncate
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    lsn: int
    ts_ms: int
    version: int = 0

    def __post_init__(self) -> None:
        if self.version == 0:
            object.__setattr__(self, "version", self.lsn)
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.op in ("c", "u", "r") and self.after is None:
            raise ValueError(f"a {self.op!r} event needs its after row")
        if (self.op == "t") != (not self.key):
            raise ValueError("a truncate, and only a truncate, has no key")

    @property
    def is_delete(self) -> bool:
        return self.op == "d"

    @property
    def is_truncate(self) -> bool:
        return self.op == "t"

    @property
    def row(self) -> dict[str, Any]:
        """The row this change leaves behind; for a delete, the removed row's key columns."""
        if self.op == "t":
            return {}
        if self.op == "d":
            return dict(zip(self.table.key, self.key, strict=True))
        assert self.after is not None  # guaranteed by __post_init__
        return self.after


class _Refused(Exception):
    """A column value the decoder cannot accept; the message says why, without the value."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------------------
# Per-type decoders: Debezium JSON value in, Python value out.


def _decode_text(value: Any) -> str:
    if type(value) is not str:
        raise _Refused(f"expected a string, got {_json_type(value)}")
    return value


def _integer_decoder(column_type: str) -> Callable[[Any], int]:
    low, high = _INT_RANGES[column_type]

    def decode(value: Any) -> int:
        # type() rather than isinstance(): JSON true must not pass as 1.
        if type(value) is not int:
            raise _Refused(f"expected an integer, got {_json_type(value)}")
        if not low <= value <= high:
            raise _Refused(f"integer out of {column_type} range")
        return value

    return decode


def _decode_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Refused(f"expected a boolean, got {_json_type(value)}")
    return value


def _numeric_decoder(scale: int) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        # decimal.handling.mode=string: a JSON number would mean the connector sends doubles, which are inexact.
        if type(value) is not str:
            raise _Refused(f"expected a decimal string, got {_json_type(value)}")
        try:
            return exact_decimal(value, scale)
        except ValueError as exc:
            raise _Refused(f"decimal string {exc} (numeric scale {scale})") from None

    return decode


def _decode_timestamptz(value: Any) -> datetime:
    if type(value) is not str:
        raise _Refused(f"expected an ISO-8601 timestamp string, got {_json_type(value)}")
    if _USUAL_TIMESTAMP(value):
        # Debezium's usual form, "2025-03-01T12:00:00.123456Z": the standard parser, many times faster. A string
        # of this shape it refuses takes the full path below, which says why.
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise _Refused("expected an ISO-8601 timestamp string with a zone, got a string that does not parse")
    year, month, day, hour, minute, second, fraction, zulu, sign, offset_h, offset_m = match.groups()
    fraction = fraction or ""
    if fraction[6:].strip("0"):
        # PostgreSQL keeps microseconds, so finer digits mean something else produced the value; rounding
        # them away would hide that.
        raise _Refused("timestamp has sub-microsecond digits")
    try:
        tz = UTC
        if not zulu:
            offset = timedelta(hours=int(offset_h), minutes=int(offset_m))
            tz = timezone(-offset if sign == "-" else offset)
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(fraction[:6].ljust(6, "0")),
            tzinfo=tz,
        )
        return parsed if zulu else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _Refused("timestamp is not a valid date and time") from None


def _decode_text_array(value: Any) -> list[str]:
    if type(value) is not list:
        raise _Refused(f"expected an array of strings, got {_json_type(value)}")
    for item in value:
        # A NULL element is legal in PostgreSQL but ClickHouse's Array(String) cannot hold it.
        if type(item) is not str:
            raise _Refused(f"expected an array of strings, got an array containing {_json_type(item)}")
    return value


def _refuse_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number out of float range")
    return number


def _decode_jsonb(value: Any) -> Any:
    # Debezium sends jsonb as its JSON text inside a JSON string, not as a nested object.
    if type(value) is not str:
        raise _Refused(f"expected JSON text in a string, got {_json_type(value)}")
    try:
        return json.loads(value, parse_constant=_refuse_json_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise _Refused("expected JSON text in a string, got a string that is not valid JSON") from None


def _decoder(column: Column) -> Callable[[Any], Any]:
    if column.type in _INT_RANGES:
        return _integer_decoder(column.type)
    if column.type == "numeric":
        return _numeric_decoder(column.scale or 0)
    return {
        "text": _decode_text,
        "bool": _decode_bool,
        "timestamptz": _decode_timestamptz,
        "text[]": _decode_text_array,
        "jsonb": _decode_jsonb,
    }[column.type]


@dataclass(frozen=True)
class _ColumnCodec:
    name: str
    nullable: bool
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]
    # None in a NOT NULL jsonb column can only be JSON null ('null'::jsonb), which travels as the text "null".
    json_null: bool


def _encoder(column: Column) -> Callable[[Any], Any]:
    if column.type == "numeric":
        scale = column.scale or 0
        return lambda v: decimal_text(v, scale)
    if column.type == "timestamptz":
        return format_timestamp
    if column.type == "jsonb":
        return _encode_jsonb
    if column.type == "text[]":
        return list
    return lambda v: v


def _encode_jsonb(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# Keyed by id(): hashing a SyncedTable hashes every column on each call. Each entry keeps its table alive, so an
# id is never reused for another table while its entry exists.
_CODECS: dict[int, tuple[SyncedTable, tuple[_ColumnCodec, ...], dict[str, _ColumnCodec]]] = {}


def _codecs(table: SyncedTable) -> tuple[tuple[_ColumnCodec, ...], dict[str, _ColumnCodec]]:
    entry = _CODECS.get(id(table))
    if entry is None or entry[0] is not table:
        codecs = tuple(
            _ColumnCodec(c.name, c.nullable, _decoder(c), _encoder(c), c.type == "jsonb" and not c.nullable)
            for c in table.columns
        )
        entry = (table, codecs, {c.name: c for c in codecs})
        _CODECS[id(table)] = entry
    return entry[1], entry[2]


def _decode_value(table: SyncedTable, codec: _ColumnCodec, value: Any, where: str = "") -> Any:
    if value is None:
        if codec.nullable:
            return None
        raise MalformedEventError(f"{where}{table.name}.{codec.name}: null in a NOT NULL column", column=codec.name)
    try:
        return codec.decode(value)
    except _Refused as exc:
        raise MalformedEventError(f"{where}{table.name}.{codec.name}: {exc}", column=codec.name) from None


# ---------------------------------------------------------------------------------------------------------------
# Rows


def decode_row(table: SyncedTable, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A Debezium row image (`before` or `after`) as a Python-typed dict keyed by PostgreSQL column name.

    text -> str, int/bigint -> int, bool -> bool, numeric -> `Decimal` at the column's scale (refused if that
    would drop digits), timestamptz -> UTC-aware `datetime` (refused if it has non-zero digits beyond
    microseconds), text[] -> list[str], jsonb -> the parsed JSON value. NULL is accepted only in nullable columns;
    the JSON value null ('null'::jsonb) in a NOT NULL jsonb column decodes to None too, the only thing None can
    mean there.

    Every catalog column must be present. Columns the catalog does not know are ignored on purpose: a column
    added in PostgreSQL is schema drift, reported by the schema checks, and must not stop the sync of the
    columns we do know. Raises `MalformedEventError`.
    """
    if not isinstance(raw, Mapping):
        raise MalformedEventError(f"{table.name}: expected a row object, got {_json_type(raw)}")
    codecs, _ = _codecs(table)
    row: dict[str, Any] = {}
    for codec in codecs:
        value = raw.get(codec.name, _MISSING)
        if value is _MISSING:
            raise MalformedEventError(f"{table.name}.{codec.name}: column missing from the row", column=codec.name)
        row[codec.name] = _decode_value(table, codec, value)
    return row


def decode_partial_row(
    table: SyncedTable, raw: Any, *, new: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The columns of an old row image (`before`) that decode, keyed by PostgreSQL column name.

    A value the decoder refuses, a NULL Debezium puts in a NOT NULL column of a key-only image
    (`REPLICA IDENTITY DEFAULT`), or a missing column is left out instead of refusing the event: the old
    image only informs, the stores never hold it. `new` is the new image, raw and decoded: a column whose raw
    value did not change takes the decoded new value (immutable values only) instead of being decoded again.
    """
    if not isinstance(raw, Mapping):
        return {}
    codecs, _ = _codecs(table)
    row: dict[str, Any] = {}
    raw_new, decoded_new = new if new is not None else ({}, {})
    for codec in codecs:
        value = raw.get(codec.name, _MISSING)
        if value is _MISSING or (value is None and not (codec.nullable or codec.json_null)):
            continue
        if value is not None and type(value) in (str, int) and raw_new.get(codec.name, _MISSING) == value:
            same = decoded_new.get(codec.name, _MISSING)
            if same is not _MISSING and not isinstance(same, list | dict):
                row[codec.name] = same
                continue
        try:
            row[codec.name] = _decode_value(table, codec, value)
        except MalformedEventError:
            continue
    return row


def encode_row_like_debezium(table: SyncedTable, row: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `decode_row`: a Python-typed row as the connector would put it in `before`/`after`.

    Decimal -> plain string at the column's scale, datetime -> ISO 8601 UTC with six fraction digits and "Z",
    jsonb -> its JSON text (None in a NOT NULL jsonb column is JSON null), text[] -> list. Only catalog columns
    are emitted, in catalog order.
    """
    codecs, _ = _codecs(table)
    encoded: dict[str, Any] = {}
    for codec in codecs:
        value = row.get(codec.name, _MISSING)
        if value is _MISSING:
            raise ValueError(f"{table.name}.{codec.name}: column missing from the row")
        if value is None and not codec.json_null:
            encoded[codec.name] = None
            continue
        try:
            encoded[codec.name] = codec.encode(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{table.name}.{codec.name}: {exc}") from None
    return encoded


# ---------------------------------------------------------------------------------------------------------------
# Events


def table_for_topic(topic: str) -> SyncedTable:
    """The catalog table a `cdc-<Table>` topic carries; `UnknownTableError` for any other topic."""
    if not topic.startswith(TOPIC_PREFIX):
        raise UnknownTableError(topic)
    return catalog_table(topic[len(TOPIC_PREFIX) :])


def _load_json(data: bytes, what: str) -> Any:
    try:
        # orjson: the same documents as `json.loads` here, without NaN/Infinity, in a fraction of the time.
        return orjson.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # JSONDecodeError's own message carries only a position, never the document.
        where = f" ({exc.msg} at position {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise MalformedEventError(f"{what} is not valid UTF-8 JSON{where}") from None


def _describe_name(value: Any) -> str:
    """A table name from the envelope, shown only when it looks like an identifier; otherwise just its type."""
    if isinstance(value, str) and len(value) <= 63 and value.replace("_", "a").isalnum():
        return repr(value)
    return f"a {_json_type(value)}"


def _decode_key(table: SyncedTable, key: bytes) -> tuple[Any, ...]:
    raw = _load_json(key, f"{table.topic} key")
    if not isinstance(raw, dict):
        raise MalformedEventError(f"{table.topic} key: expected a JSON object, got {_json_type(raw)}")
    _, by_name = _codecs(table)
    values = []
    for name in table.key:
        if name not in raw:
            raise MalformedEventError(f"{table.topic} key: {table.name}.{name} is missing", column=name)
        values.append(_decode_value(table, by_name[name], raw[name], where="key: "))
    return tuple(values)


# ---------------------------------------------------------------------------------------------------------------
# The usual event, read in one pass
#
# Nearly every record is an ordinary insert, update, delete or snapshot read whose values are already of their
# columns' JSON types. msgspec reads such a record into typed structs generated from the catalog, checking types,
# NULLs, integer ranges and that every column is there while it parses; the values JSON cannot type (numeric,
# timestamptz, jsonb) then go through the same per-type decoders as above. Anything else (a truncate, a key-only
# old image, a refused value, a record that is not valid JSON) is not read here: `decode_event` reads it the full
# way, which also says why it refuses it. So this reading accepts a subset of what the full one accepts and returns
# the same event for it (`test_debezium_fast.py` holds the two together). One difference is by design: a field the
# pipeline never reads (say `transaction` or `source.txId`) is checked for JSON syntax only, so a number beyond a
# double's range or bytes that are not UTF-8 there do not make a change poison; in a field it reads they do.

_PYTHON_TYPES: dict[str, Any] = {
    "text": str,
    "int": Annotated[int, msgspec.Meta(ge=_INT_RANGES["int"][0], le=_INT_RANGES["int"][1])],
    "bigint": Annotated[int, msgspec.Meta(ge=_INT_RANGES["bigint"][0], le=_INT_RANGES["bigint"][1])],
    "bool": bool,
    "text[]": list[str],
    # Spelled as strings by the connector, decoded after the parse by the column's own decoder.
    "numeric": str,
    "timestamptz": str,
    "jsonb": str,
}
_AFTER_PARSE = frozenset({"numeric", "timestamptz", "jsonb"})


class _Source(msgspec.Struct, gc=False):
    lsn: Annotated[int, msgspec.Meta(gt=0)]
    table: str
    ts_ms: Annotated[int, msgspec.Meta(ge=0)]
    sequence: str | None = None


def _struct_fields(columns: tuple[Column, ...]) -> list[tuple[str, Any]]:
    # No defaults: a column missing from the image fails the parse, as `decode_row` refuses it.
    return [(c.name, _PYTHON_TYPES[c.type] | None if c.nullable else _PYTHON_TYPES[c.type]) for c in columns]


def _envelope_decoder(name: str, before: type, after: type) -> msgspec.json.Decoder[Any]:
    """A decoder of the usual envelope: an insert, update, delete or snapshot read with its source and images."""
    envelope = msgspec.defstruct(
        name,
        [
            ("op", Literal["c", "u", "d", "r"]),
            ("source", _Source),
            ("before", before | None, None),
            ("after", after | None, None),
        ],
        gc=False,  # nothing in an event refers back to it: no cycles for the collector to look for
    )
    return msgspec.json.Decoder(envelope)


@dataclass(frozen=True)
class _FastReader:
    envelope: msgspec.json.Decoder[Any]
    key: msgspec.json.Decoder[Any]
    after_parse: tuple[_ColumnCodec, ...]  # the columns whose strings are decoded after the parse
    key_after_parse: tuple[_ColumnCodec, ...]


def _per_table(cache: dict[int, tuple[SyncedTable, _R]], table: SyncedTable, build: Callable[[SyncedTable], _R]) -> _R:
    """What `build` makes of a table, made once: keyed by the table's identity, and held with the table so that its
    id is never taken by another one."""
    entry = cache.get(id(table))
    if entry is not None and entry[0] is table:
        return entry[1]
    made = build(table)
    cache[id(table)] = (table, made)
    return made


_READERS: dict[int, tuple[SyncedTable, _FastReader | None]] = {}


def _fast_reader(table: SyncedTable) -> _FastReader | None:
    """The one-pass reader of a table's events; None when its column names cannot be struct fields."""
    return _per_table(_READERS, table, _build_fast_reader)


def _build_fast_reader(table: SyncedTable) -> _FastReader | None:
    reader = None
    names = [c.name for c in table.columns]
    if all(n.isidentifier() and not keyword.iskeyword(n) and not n.startswith("_") for n in names):
        _, by_name = _codecs(table)
        row = msgspec.defstruct(f"{table.name}Row", _struct_fields(table.columns), gc=False)
        key_columns = tuple(table.column(k) for k in table.key)
        reader = _FastReader(
            envelope=_envelope_decoder(f"{table.name}Event", row, row),
            key=msgspec.json.Decoder(msgspec.defstruct(f"{table.name}Key", _struct_fields(key_columns), gc=False)),
            after_parse=tuple(by_name[c.name] for c in table.columns if c.type in _AFTER_PARSE),
            key_after_parse=tuple(by_name[c.name] for c in key_columns if c.type in _AFTER_PARSE),
        )
    return reader


def _typed(image: Any, after_parse: tuple[_ColumnCodec, ...]) -> dict[str, Any]:
    """A parsed image as a row; raises `_Refused` for a value its column's decoder refuses."""
    row = msgspec.structs.asdict(image)
    for codec in after_parse:
        value = row[codec.name]
        if value is not None:
            row[codec.name] = codec.decode(value)
    return row


def _read_usual(table: SyncedTable, key: bytes | None, value: bytes) -> ChangeEvent | None:
    """The event in one pass, or None when it is not the usual kind (then `decode_event` reads it the full way)."""
    reader = _fast_reader(table)
    if reader is None:
        return None
    try:
        envelope = reader.envelope.decode(value)
        source = envelope.source
        if source.table != table.name:
            return None
        version = stream_version(envelope.op, source.lsn, source.sequence)
        if version > MAX_VERSION:
            return None
        if envelope.op == "d":
            if envelope.after is not None or envelope.before is None:
                return None
            before, after = _typed(envelope.before, reader.after_parse), None
            row_key = tuple(before[name] for name in table.key)
        else:
            if envelope.after is None:
                return None
            after = _typed(envelope.after, reader.after_parse)
            before = None if envelope.before is None else _typed(envelope.before, reader.after_parse)
            row_key = tuple(after[name] for name in table.key)
        if key is not None and tuple(_typed(reader.key.decode(key), reader.key_after_parse).values()) != row_key:
            return None
    except (msgspec.ValidationError, msgspec.DecodeError, _Refused):
        return None
    return ChangeEvent(
        table=table,
        op=envelope.op,
        key=row_key,
        before=before,
        after=after,
        lsn=source.lsn,
        ts_ms=source.ts_ms,
        version=version,
    )


# ---------------------------------------------------------------------------------------------------------------
# A batch of usual events, read as columns
#
# A mirror writes each change's row as it is, so a batch of one table's usual changes can go to it as columns,
# with no object per change. `read_change_columns` reads such a batch in one pass per record and checks the values
# JSON cannot type as whole columns (Arrow); it takes the batch only when every record in it is one that
# `decode_event` decodes, to the same row and version (`test_debezium_columns.py` holds the two together), and
# otherwise returns None, for the records to be decoded one by one. The pass is compiled (`_columns.c`: straight
# into Arrow buffers, the GIL released, about 1.5 µs a record against 3.5 with msgspec) for the tables whose
# columns it can type; it leaves to msgspec any batch it is not sure of (`test_compiled_columns.py`).

_USUAL_TIMESTAMP_COLUMN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$"
_PLAIN_DECIMAL_COLUMN = r"^-?\d{1,30}(\.\d+)?$"  # a value Arrow's decimal cast reads exactly, or refuses


def _arrow_type(column: Column) -> pa.DataType | None:
    """The Arrow type a column's values are read into; None for a type read only event by event (jsonb)."""
    return {
        "text": pa.string(),
        "int": pa.int32(),
        "bigint": pa.int64(),
        "bool": pa.bool_(),
        "text[]": pa.list_(pa.string()),
        "numeric": pa.string(),
        "timestamptz": pa.string(),
    }.get(column.type)


@dataclass(frozen=True)
class ChangeColumns:
    """The changes of one table in a batch, as columns. `rows` has one column per catalog column, by PostgreSQL
    name: the row each change leaves (a delete leaves its key, the other columns null), typed as `decode_row`
    types it (timestamptz as UTC timestamps, numeric as decimals at the column's scale). `keys`, `versions` and
    `deletes` are per change, in batch order."""

    table: SyncedTable
    rows: pa.Table
    key_columns: tuple[list[Any], ...]  # each change's key, one list per key column (`keys` as tuples)
    versions: list[int]
    deletes: list[bool]

    def __len__(self) -> int:
        return len(self.versions)

    @property
    def keys(self) -> list[tuple[Any, ...]]:
        return list(zip(*self.key_columns, strict=True))


@dataclass(frozen=True)
class _ColumnsReader:
    envelope: msgspec.json.Decoder[Any]
    key: msgspec.json.Decoder[Any]
    schema: pa.Schema
    key_positions: tuple[int, ...]


_COLUMN_READERS: dict[int, tuple[SyncedTable, _ColumnsReader | None]] = {}


def _columns_reader(table: SyncedTable) -> _ColumnsReader | None:
    return _per_table(_COLUMN_READERS, table, _build_columns_reader)


def _build_columns_reader(table: SyncedTable) -> _ColumnsReader | None:
    reader = None
    usual = _fast_reader(table)
    types = [_arrow_type(c) for c in table.columns]
    key_columns = tuple(table.column(k) for k in table.key)
    # A key spelled as a string (numeric, timestamptz) would be compared and kept by its spelling: one by one.
    plain_key = all(c.type not in _AFTER_PARSE for c in key_columns)
    if usual is not None and plain_key and all(t is not None for t in types):
        # The old image is read for its key only: a delete applies from it, an update's row is its new image.
        old_key = msgspec.defstruct(f"{table.name}OldKey", _struct_fields(key_columns), gc=False)
        row = msgspec.defstruct(f"{table.name}Columns", _struct_fields(table.columns), gc=False)
        names = [c.name for c in table.columns]
        reader = _ColumnsReader(
            envelope=_envelope_decoder(f"{table.name}ColumnsEvent", old_key, row),
            key=usual.key,
            schema=pa.schema([pa.field(n, t) for n, t in zip(names, types, strict=True)]),
            key_positions=tuple(names.index(k) for k in table.key),
        )
    return reader


_astuple = msgspec.structs.astuple
_SOURCE, _TABLE, _OP, _AFTER = attrgetter("source"), attrgetter("table"), attrgetter("op"), attrgetter("after")


def read_change_columns(
    table: SyncedTable, keys_given: list[bytes | None], values: list[bytes]
) -> ChangeColumns | None:
    """A batch of one table's records (their Kafka keys and values; no tombstones) as columns, or None unless every
    record is a usual change (see `_read_usual`) of a table whose columns all have an Arrow reading (not jsonb).

    Read by the compiled reading (`_columns.c`) when it is sure of every record, else with msgspec: the two give the
    same columns (`test_compiled_columns.py`)."""
    if not values:
        return None
    compiled = _read_compiled(table, keys_given, values)
    if compiled is not None:
        return compiled
    return _read_msgspec(table, keys_given, values)


def _read_msgspec(table: SyncedTable, keys_given: list[bytes | None], values: list[bytes]) -> ChangeColumns | None:
    """`read_change_columns` with msgspec, one record at a time, then whole columns."""
    reader = _columns_reader(table)
    if reader is None:
        return None
    try:
        events = list(map(reader.envelope.decode, values))
        sources = list(map(_SOURCE, events))
        if set(map(_TABLE, sources)) != {table.name}:
            return None
        ops = list(map(_OP, events))
        afters = list(map(_AFTER, events))
        names = [c.name for c in table.columns]
        if "d" not in ops:
            if None in afters:
                return None  # a change without its new image
            deletes = [False] * len(ops)
            columns = [list(map(attrgetter(name), afters)) for name in names]
        else:
            deletes = [op == "d" for op in ops]
            if any(delete == (after is not None) for delete, after in zip(deletes, afters, strict=True)):
                return None  # a delete with a new image, or another change without one
            # A delete leaves its key, from its old image; its other columns are null.
            olds = [e.before if delete else e.after for e, delete in zip(events, deletes, strict=True)]
            if None in olds:
                return None
            columns = [
                list(map(attrgetter(name), olds))
                if name in table.key
                else [None if delete else getattr(after, name) for after, delete in zip(afters, deletes, strict=True)]
                for name in names
            ]
        key_columns = tuple(columns[p] for p in reader.key_positions)
        keys = list(zip(*key_columns, strict=True))
        if None not in keys_given:
            if list(map(_astuple, map(reader.key.decode, keys_given))) != keys:  # type: ignore[arg-type]
                return None
        else:
            for given, key in zip(keys_given, keys, strict=True):
                if given is not None and _astuple(reader.key.decode(given)) != key:
                    return None
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    versions = stream_versions(ops, [s.lsn for s in sources], [s.sequence for s in sources])
    if max(versions) > MAX_VERSION:
        return None
    arrays = [pa.array(column, type=field.type) for field, column in zip(reader.schema, columns, strict=True)]
    rows = _checked_rows(table, arrays)
    if rows is None:
        return None
    return ChangeColumns(table=table, rows=rows, key_columns=key_columns, versions=versions, deletes=deletes)


def _checked_rows(table: SyncedTable, arrays: list[pa.Array]) -> pa.Table | None:
    """A batch's columns as `decode_row` types them, from the values as JSON spells them (timestamps and decimals
    as strings); None when a value is one only `decode_row` reads (an offset, an exponent, a date that is not)."""
    typed = []
    for column, array in zip(table.columns, arrays, strict=True):
        if column.type == "timestamptz":
            if pc.all(pc.match_substring_regex(array, _USUAL_TIMESTAMP_COLUMN)).as_py() not in (True, None):
                return None
            try:
                array = array.cast(pa.timestamp("us", tz="UTC"))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # not a date (February 30th)
                return None
        elif column.type == "numeric":
            if pc.all(pc.match_substring_regex(array, _PLAIN_DECIMAL_COLUMN)).as_py() not in (True, None):
                return None
            try:
                array = array.cast(pa.decimal128(38, column.scale or 0))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # more digits than the scale, or than 38
                return None
        typed.append(array)
    return pa.Table.from_arrays(typed, names=[c.name for c in table.columns])


# The compiled reading's kind of each column type (`_columns.c`); a table with another type (text[], jsonb) is read
# with msgspec. A key column must be text or an integer there.
_COMPILED_KINDS = {"text": 0, "numeric": 0, "timestamptz": 0, "int": 1, "bigint": 2, "bool": 3}
_COMPILED_KEY_TYPES = frozenset({"text", "int", "bigint"})
_ARROW_OF_KIND = {0: pa.string(), 1: pa.int32(), 2: pa.int64(), 3: pa.bool_()}


@dataclass(frozen=True)
class _CompiledSpec:
    table: bytes
    columns: tuple[tuple[bytes, int, bool], ...]
    key_positions: tuple[int, ...]


_COMPILED: dict[int, tuple[SyncedTable, _CompiledSpec | None]] = {}


def _compiled_spec(table: SyncedTable) -> _CompiledSpec | None:
    return _per_table(_COMPILED, table, _build_compiled_spec)


def _build_compiled_spec(table: SyncedTable) -> _CompiledSpec | None:
    names = [c.name for c in table.columns]
    key_positions = tuple(names.index(k) for k in table.key)
    if not all(c.type in _COMPILED_KINDS for c in table.columns) or not all(
        table.columns[p].type in _COMPILED_KEY_TYPES for p in key_positions
    ):
        return None
    if _columns is None:  # said once per table and process: the sink works, only slower
        log.warning(
            "%s: its change events are read with msgspec, about a quarter slower: the compiled reading "
            "(knowton_pipeline/lib/_columns.c) was not built; install the project where a C compiler and Python's "
            "headers are present",
            table.name,
        )
        return None
    return _CompiledSpec(
        table=table.name.encode(),
        columns=tuple((c.name.encode(), _COMPILED_KINDS[c.type], c.nullable) for c in table.columns),
        key_positions=key_positions,
    )


def _arrow_column(kind: int, n: int, read: tuple[bytes, int, bytes | None, bytes]) -> pa.Array:
    validity, nulls, offsets, data = read
    buffers = [pa.py_buffer(validity) if nulls else None]
    if offsets is not None:
        buffers.append(pa.py_buffer(offsets))
    buffers.append(pa.py_buffer(data))
    return pa.Array.from_buffers(_ARROW_OF_KIND[kind], n, buffers, null_count=nulls)


def _read_compiled(table: SyncedTable, keys_given: list[bytes | None], values: list[bytes]) -> ChangeColumns | None:
    """`read_change_columns` by the compiled reading: None when it is not sure of a record (see `_columns.c`)."""
    spec = _compiled_spec(table)
    if spec is None:
        return None
    read = _columns.read_batch(values, keys_given, spec.table, spec.columns, spec.key_positions)
    if read is None:
        return None
    op_bytes, lsn_bytes, sequence, columns = read
    n = len(values)
    ops = op_bytes.decode("ascii")
    lsn = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(lsn_bytes)])
    versions = stream_versions_of(ops, lsn, _arrow_column(0, n, sequence))
    if max(versions) > MAX_VERSION:
        return None
    arrays = [_arrow_column(kind, n, column) for (_, kind, _), column in zip(spec.columns, columns, strict=True)]
    rows = _checked_rows(table, arrays)
    if rows is None:
        return None
    return ChangeColumns(
        table=table,
        rows=rows,
        key_columns=tuple(arrays[p].to_pylist() for p in spec.key_positions),
        versions=versions,
        deletes=list(map("d".__eq__, ops)),
    )


def decode_event(topic: str, key: bytes | None, value: bytes | None) -> ChangeEvent | None:
    """Decode one Kafka record from a `cdc-<Table>` topic; None for the tombstone that follows a delete.

    Raises `UnknownTableError` (from the catalog) for a topic that is not `cdc-` plus a catalog table, and
    `MalformedEventError` for a record that can never be applied: not JSON, an unknown `op`, no positive
    `source.lsn`, a `source.table` other than the topic's, a c/u/r without `after` or whose `after` does not
    decode, a delete with no key anywhere, or a Kafka key that disagrees with the row's key. The old image
    (`before`) never makes an event poison: see `ChangeEvent`.
    """
    table = table_for_topic(topic)
    if value is None:
        return None
    usual = _read_usual(table, key, value)
    return usual if usual is not None else _read_full(table, topic, key, value)


def _read_full(table: SyncedTable, topic: str, key: bytes | None, value: bytes) -> ChangeEvent:
    """Any record, read field by field: the reading that defines what is accepted, and says why it refuses."""
    envelope = _load_json(value, f"{topic} value")
    if not isinstance(envelope, dict):
        raise MalformedEventError(f"{topic} value: expected a JSON object, got {_json_type(envelope)}")
    if "op" not in envelope and "payload" in envelope and "schema" in envelope:
        raise MalformedEventError(
            f"{topic} value has a schema/payload envelope: the converter needs schemas.enable=false"
        )

    op = envelope.get("op")
    if op not in OPS:
        shown = repr(op) if isinstance(op, str) and len(op) <= 8 else f"a {_json_type(op)}"
        raise MalformedEventError(f"{topic}: op must be one of {', '.join(OPS)}, got {shown}")

    source = envelope.get("source")
    if not isinstance(source, dict):
        raise MalformedEventError(f"{topic}: source must be an object, got {_json_type(source)}")
    lsn = source.get("lsn")
    if lsn is None and op == "r":
        # An incremental snapshot's row has no LSN of its own: it is emitted at the position in `sequence`.
        lsn = sequence_position(source.get("sequence"))
    if type(lsn) is not int or lsn <= 0:
        got = "a non-positive integer" if type(lsn) is int else _json_type(lsn)
        raise MalformedEventError(f"{topic}: source.lsn must be a positive integer, got {got}")
    if source.get("table") != table.name:
        raise MalformedEventError(
            f"{topic}: source.table is {_describe_name(source.get('table'))}, the topic carries {table.name!r}"
        )
    ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
    if type(ts_ms) is not int or ts_ms < 0:
        raise MalformedEventError(f"{topic}: source.ts_ms must be a non-negative integer, got {_json_type(ts_ms)}")

    version = stream_version(op, lsn, source.get("sequence"))
    if version > MAX_VERSION:
        raise MalformedEventError(f"{topic}: source.lsn is beyond the largest version the stores can hold")
    raw_before, raw_after = envelope.get("before"), envelope.get("after")
    if op == "t":
        # TRUNCATE: Debezium sends it with no key and no row images (skipped.operations must not skip "t").
        return ChangeEvent(table=table, op=op, key=(), before=None, after=None, lsn=lsn, ts_ms=ts_ms, version=version)
    if op == "d":
        if raw_after is not None:
            raise MalformedEventError(f"{topic}: a delete must have after null, got {_json_type(raw_after)}")
        if raw_before is not None and not isinstance(raw_before, Mapping):
            raise MalformedEventError(f"{topic}: before must be an object, got {_json_type(raw_before)}")
        before, after = decode_partial_row(table, raw_before), None
        # A delete needs only its key: from the old image when it has the key columns, else from the Kafka key.
        if all(name in before for name in table.key):
            row_key = tuple(before[name] for name in table.key)
        elif key is not None:
            return ChangeEvent(
                table=table,
                op=op,
                key=_decode_key(table, key),
                before=before,
                after=None,
                lsn=lsn,
                ts_ms=ts_ms,
                version=version,
            )
        else:
            raise MalformedEventError(f"{topic}: a delete needs its key, in before or in the Kafka key")
    else:
        if raw_after is None:
            raise MalformedEventError(f"{topic}: op {op!r} needs after, got null")
        after = decode_row(table, raw_after)
        before = None if raw_before is None else decode_partial_row(table, raw_before, new=(raw_after, after))
        row_key = tuple(after[name] for name in table.key)

    if key is not None and _decode_key(table, key) != row_key:
        raise MalformedEventError(f"{topic}: the Kafka key disagrees with the row's key ({', '.join(table.key)})")
    return ChangeEvent(
        table=table, op=op, key=row_key, before=before, after=after, lsn=lsn, ts_ms=ts_ms, version=version
    )
