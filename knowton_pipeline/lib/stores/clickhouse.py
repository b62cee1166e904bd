"""ClickHouse, the analytics store: its mirrors' spelling of canonical rows, its reconcile side and its writer.

A mirror is a `ReplacingMergeTree(version, is_deleted)` table read with `FINAL`: the highest version of a key wins
and a deleted key is hidden. The client is the embedded engine (chDB) or a ClickHouse server, by DSN
(`lib/clickhouse.py`); nothing here depends on which.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from clickhouse_connect.driver import exceptions as ch_errors
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, TABLES, Column, SyncedTable
from knowton_pipeline.lib import clickhouse as clickhouse_client
from knowton_pipeline.lib.canonical import HASH_MASK, Shape, key_columns, plan, segment_parameters
from knowton_pipeline.lib.reconcile.bisect import Checksum, Key, Segment, runs
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores.base import (
    LINEAR_PARTS,
    RANGES_PER_QUERY,
    Prepared,
    Side,
    StoreRefusedError,
    TransientStoreError,
    WriteItem,
    WriteOutcome,
    buckets,
    chunks,
    no_updated_at,
    short_starts,
    single_key,
    sum_by_day,
    text_prefix,
    tombstones_written,
)
from knowton_pipeline.lib.transform import (
    CLICKHOUSE_DELETED_COLUMN,
    CLICKHOUSE_VERSION_COLUMN,
    clickhouse_block,
    clickhouse_columns,
    format_timestamp,
    to_clickhouse_row,
)

if TYPE_CHECKING:
    from knowton_pipeline.lib.debezium import ChangeColumns

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


def key_range(table: SyncedTable, lower_bound: bool, upper_bound: bool) -> str:
    columns = key_columns(table)
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


def canonical_sql(table: SyncedTable) -> str:
    """An expression for the canonical string of a mirror row, over the mirror's (unqualified) columns."""
    fields = [_clickhouse_spelling(f.column)(backtick(f.column.target_name)) for f in plan(table).fields]
    return "concat(" + ", '\\t', ".join(fields) + ")"


def hash_sql(table: SyncedTable) -> str:
    """An expression for `row_hash` of a mirror row, as UInt64: the last 8 MD5 bytes, big-endian, low 60 bits."""
    return f"bitAnd(reinterpretAsUInt64(reverse(substring(MD5({canonical_sql(table)}), 9, 8))), {HASH_MASK})"


def _mirror(table: SyncedTable, database: str) -> str:
    return f"{backtick(database)}.{backtick(table.clickhouse_table)}"


# Every mirror stores its rows' hash in a MATERIALIZED column: ClickHouse computes it from the row's columns when
# the row is inserted, and again when a mutation changes them, so a checksum reads one number a row instead of
# spelling and hashing every column (about a fifth of the cost). The column's comment names the expression it holds;
# until the schema is applied with this code's expression, and every part rewritten with it, the reconcile side
# computes the hash from the columns instead.
STORED_HASH_COLUMN = "stored_hash"


def stored_hash_tag(table: SyncedTable) -> str:
    """The comment of a mirror's stored-hash column once it holds `hash_sql(table)` in every part."""
    return "knowton row hash " + hashlib.sha256(hash_sql(table).encode()).hexdigest()[:16]


def _stored_hash_column(client: ClickHouseClient, table: SyncedTable, database: str) -> tuple[str, str] | None:
    rows = client.query(
        "SELECT default_kind, comment FROM system.columns "
        "WHERE database = {db:String} AND table = {t:String} AND name = {c:String}",
        parameters={"db": database, "t": table.clickhouse_table, "c": STORED_HASH_COLUMN},
    ).result_rows
    return (rows[0][0], rows[0][1]) if rows else None


def stored_hash_ready(client: ClickHouseClient, table: SyncedTable, database: str = CLICKHOUSE_DATABASE) -> bool:
    """Whether the mirror's stored hash is this code's `hash_sql`, computed in every part."""
    return _stored_hash_column(client, table, database) == ("MATERIALIZED", stored_hash_tag(table))


def ensure_stored_hash(client: ClickHouseClient, table: SyncedTable, database: str = CLICKHOUSE_DATABASE) -> str | None:
    """Give the mirror its stored-hash column with this code's expression, computed in every part; what was done,
    None when it already was. The comment is set last, so a mirror left half way is read as not ready."""
    found = _stored_hash_column(client, table, database)
    if found == ("MATERIALIZED", stored_hash_tag(table)):
        return None
    mirror, column = _mirror(table, database), backtick(STORED_HASH_COLUMN)
    verb = "ADD" if found is None else "MODIFY"
    client.command(f"ALTER TABLE {mirror} {verb} COLUMN {column} UInt64 MATERIALIZED {hash_sql(table)} COMMENT ''")
    # An insert that began before the ALTER may commit a part after the mutation was queued, with the hash it was
    # begun with: the column is materialized again until no row holds another value than the expression's.
    for _ in range(3):
        client.command(f"ALTER TABLE {mirror} MATERIALIZE COLUMN {column} SETTINGS mutations_sync = 2")
        stale = client.query(f"SELECT count() FROM {mirror} WHERE {column} != {hash_sql(table)}").result_rows[0][0]
        if not stale:
            break
    else:
        raise RuntimeError(
            f"{database}.{table.clickhouse_table}.{STORED_HASH_COLUMN}: {stale} row(s) still hold another hash after "
            "three materializations; apply the schema again when no writer is running"
        )
    client.command(f"ALTER TABLE {mirror} COMMENT COLUMN {column} '{stored_hash_tag(table)}'")
    done = "added" if found is None else "brought to this release's row hash"
    return f"clickhouse: {database}.{table.clickhouse_table}.{STORED_HASH_COLUMN} {done}"


def segment_checksum_sql(
    table: SyncedTable,
    *,
    database: str = CLICKHOUSE_DATABASE,
    lower_bound: bool = True,
    upper_bound: bool = True,
    stored: bool = False,
) -> str:
    """`SELECT row_count, checksum` over the live mirror rows (FINAL, not deleted) whose key is in
    [{lo_0:T}, {hi_0:T}): server-side parameters from `segment_parameters`. The sum is UInt128: it cannot wrap.
    `stored`: sum the stored hash (see `stored_hash_ready`) rather than compute it."""
    row_hash = backtick(STORED_HASH_COLUMN) if stored else hash_sql(table)
    return (
        f"SELECT count() AS row_count, sum(toUInt128({row_hash})) AS checksum "
        f"FROM {_mirror(table, database)} FINAL WHERE {key_range(table, lower_bound, upper_bound)}"
    )


def segment_rows_sql(
    table: SyncedTable,
    *,
    database: str = CLICKHOUSE_DATABASE,
    lower_bound: bool = True,
    upper_bound: bool = True,
) -> str:
    """The key columns, `canonical` and `row_hash` of every live mirror row in the segment, in key order."""
    keys = ", ".join(backtick(table.column(k).target_name) for k in table.key)
    return (
        f"SELECT {keys}, {canonical_sql(table)} AS canonical, {hash_sql(table)} AS row_hash "
        f"FROM {_mirror(table, database)} FINAL WHERE {key_range(table, lower_bound, upper_bound)} "
        f"ORDER BY {keys}"
    )


def segment_checksum(
    client: ClickHouseClient,
    table: SyncedTable,
    lo: Any = None,
    hi: Any = None,
    *,
    database: str = CLICKHOUSE_DATABASE,
    stored: bool = False,
) -> tuple[int, int]:
    """(count, sum of row_hash) of the live mirror rows with key in [lo, hi), computed inside ClickHouse."""
    query = segment_checksum_sql(
        table, database=database, lower_bound=lo is not None, upper_bound=hi is not None, stored=stored
    )
    row = client.query(query, parameters=segment_parameters(table, lo, hi)).result_rows[0]
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------------------------------------------------------
# The reconcile side


class ClickHouseSide:
    """A ReplacingMergeTree mirror, read with FINAL and without deleted rows. Checksums sum the stored hash when
    the mirror holds this code's (`stored_hash_ready`), else compute it from the columns; `full` always computes."""

    def __init__(
        self, client: ClickHouseClient, table: SyncedTable, *, database: str = CLICKHOUSE_DATABASE, full: bool = False
    ):
        self.ch, self.table, self.database = client, table, database
        self._full = full
        self._stored: bool | None = None  # whether checksums read the stored hash; asked at the first checksum
        key = single_key(table)
        self.label = "clickhouse"
        self._integer = table.column(key).type in ("int", "bigint")
        self.max_parts = 16384  # a key finds its part by binary search (see _search)
        self._key = backtick(table.column(key).target_name)
        self._key_type = CH_KEY_TYPES[table.column(key).type]
        self._mirror = f"{backtick(database)}.{backtick(table.clickhouse_table)}"

    def _where(self, seg: Segment) -> str:
        return key_range(self.table, seg.lo is not None, seg.hi is not None)

    @property
    def stored(self) -> bool:
        """Whether this side's checksums sum the mirror's stored hash (else they compute it from the columns)."""
        if self._stored is None:
            self._stored = not self._full and stored_hash_ready(self.ch, self.table, self.database)
        return self._stored

    def _hash(self) -> str:
        return backtick(STORED_HASH_COLUMN) if self.stored else hash_sql(self.table)

    def day_checksums(self) -> dict[date | None, Checksum]:
        day = (
            f"toDate({backtick(self.table.column(self.table.created_at).target_name)}, 'UTC')"
            if self.table.created_at
            else "CAST(NULL AS Nullable(Date))"
        )
        query = (
            f"SELECT {day} AS d, count(), sum(toUInt128({self._hash()})) "
            f"FROM {self._mirror} FINAL WHERE {self._where(Segment())} GROUP BY d"
        )
        return sum_by_day(self.ch.query(query).result_rows)

    def checksum(self, seg: Segment) -> Checksum:
        count, total = segment_checksum(self.ch, self.table, seg.lo, seg.hi, database=self.database, stored=self.stored)
        return Checksum(count, total)

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        return self.checksums_of(seg.split(points))

    def _runs(self, batch: Sequence[tuple[Segment, list[Segment]]]) -> tuple[str, dict[str, Any]]:
        """A condition matching the live rows whose key is in any of `batch`'s runs, and its parameters."""
        conditions: list[str] = []
        params: dict[str, Any] = {}
        for i, (run, _) in enumerate(batch):
            bounds = []
            for name, value, op in ((f"lo{i}", run.lo, ">="), (f"hi{i}", run.hi, "<")):
                if value is not None:
                    bounds.append(f"{self._key} {op} {{{name}:{self._key_type}}}")
                    params[name] = value
            conditions.append(f"({' AND '.join(bounds)})" if bounds else "1")
        return f"{self._where(Segment())} AND ({' OR '.join(conditions)})", params

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        out: list[Checksum] = []
        for batch in chunks(parts, self.max_parts):
            if len(batch) == 1:
                out.append(self.checksum(batch[0]))
                continue
            found = self._search(batch)
            if found is not None:
                out += self._sums(batch, *found)
            else:  # longer text starts: each key is compared with every start, a few hundred at a time
                for piece in chunks(batch, LINEAR_PARTS):
                    out += self._sums(piece, *self._linear(piece))
        return out

    def _search(self, batch: Sequence[Segment]) -> tuple[str, dict[str, Any], dict[Any, int] | None] | None:
        """How a row finds its part among `batch` by binary search: a bucket expression, its parameters and the
        part of each bucket value (None: the value is the part). None when it cannot (see below)."""
        starts = [p.lo for p in batch if p.lo is not None]
        shift = 0 if batch[0].lo is None else 1
        if self._integer:
            # roundDown gives the greatest start at or below the key (by binary search); below every start, the
            # first. A part without a lower bound (only ever first) starts at the type's smallest value.
            floor = -(2 ** (31 if self._key_type == "Int32" else 63))
            bounds = [floor, *starts] if shift == 0 else starts
            bucket = f"roundDown({self._key}, {{starts:Array({self._key_type})}})"
            return bucket, {"starts": bounds}, {start: i for i, start in enumerate(bounds)}
        # Text: with starts of at most 8 bytes, a key is at or above a start exactly when its first 8 bytes, as a
        # big-endian number (`text_prefix`), are: roundDown finds the greatest such start, transform its number.
        if not short_starts(batch):
            return None
        prefixes = [text_prefix(start) for start in starts]
        key_prefix = f"reinterpretAsUInt64(reverse(rightPad(substring({self._key}, 1, 8), 8, '\\0')))"
        found = f"roundDown({key_prefix}, {{prefixes:Array(UInt64)}})"
        at = f"transform({found}, {{prefixes:Array(UInt64)}}, {{numbers:Array(UInt32)}}, toUInt32(0))"
        # Below every start (only when the first part has no lower bound), roundDown gives the first: part 0.
        bucket = f"if({key_prefix} < {{first:UInt64}}, 0, {at}) - {shift}"
        params = {"prefixes": prefixes, "numbers": list(range(1, len(starts) + 1)), "first": prefixes[0]}
        return bucket, params, None

    def _linear(self, batch: Sequence[Segment]) -> tuple[str, dict[str, Any], None]:
        starts = [p.lo for p in batch if p.lo is not None]
        shift = 0 if batch[0].lo is None else 1
        return (
            f"arrayCount(p -> p <= {self._key}, {{starts:Array({self._key_type})}}) - {shift}",
            {"starts": starts},
            None,
        )

    def _sums(
        self, batch: Sequence[Segment], bucket: str, bucket_params: dict[str, Any], index: dict[Any, int] | None
    ) -> list[Checksum]:
        totals = [Checksum(0, 0)] * len(batch)
        for group in chunks(runs(batch), RANGES_PER_QUERY):  # each part is in one group: the sums add up
            where, params = self._runs(group)
            query = (
                f"SELECT {bucket} AS b, count(), sum(toUInt128({self._hash()})) "
                f"FROM {self._mirror} FINAL WHERE {where} GROUP BY b"
            )
            rows = self.ch.query(query, parameters={**params, **bucket_params}).result_rows
            if index is not None:
                rows = [(index[r[0]], r[1], r[2]) for r in rows]
            found = buckets(rows, len(batch))
            totals = [Checksum(x.count + y.count, x.total + y.total) for x, y in zip(totals, found, strict=True)]
        return totals

    def rows_of(self, segments: Sequence[Segment]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        for group in chunks(runs(segments), RANGES_PER_QUERY):
            where, params = self._runs(group)
            query = f"SELECT {self._key}, {canonical_sql(self.table)} FROM {self._mirror} FINAL WHERE {where}"
            out.update({r[0]: r[1] for r in self.ch.query(query, parameters=params).result_rows})
        return out

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        query = f"SELECT min({self._key}), max({self._key}), count() FROM {self._mirror} FINAL WHERE {self._where(seg)}"
        lo, hi, n = self.ch.query(query, parameters=segment_parameters(self.table, seg.lo, seg.hi)).result_rows[0]
        return None if not n else (lo, hi)

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        step = max(1, math.ceil(count / parts))
        query = (
            f"SELECT k FROM (SELECT {self._key} AS k, row_number() OVER (ORDER BY {self._key}) AS rn "
            f"FROM {self._mirror} FINAL WHERE {self._where(seg)}) WHERE rn % {{step:UInt64}} = 1 AND rn > 1 ORDER BY k"
        )
        params = {**segment_parameters(self.table, seg.lo, seg.hi), "step": step}
        return [r[0] for r in self.ch.query(query, parameters=params).result_rows]

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = segment_rows_sql(
            self.table, database=self.database, lower_bound=seg.lo is not None, upper_bound=seg.hi is not None
        )
        result = self.ch.query(query, parameters=segment_parameters(self.table, seg.lo, seg.hi))
        return {r[0]: r[1] for r in result.result_rows}

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        query = (
            f"SELECT {self._key}, {canonical_sql(self.table)} FROM {self._mirror} FINAL "
            f"WHERE {self._where(Segment())} AND {self._key} IN {{keys:Array({self._key_type})}}"
        )
        out: dict[Key, str] = {}
        for chunk in chunks(keys):
            out.update({r[0]: r[1] for r in self.ch.query(query, parameters={"keys": chunk}).result_rows})
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise no_updated_at(self.table)
        updated = backtick(self.table.column(self.table.updated_at).target_name)
        query = (
            f"SELECT {self._key} FROM {self._mirror} FINAL WHERE {self._where(Segment())} "
            f"AND {updated} >= {{since:DateTime64(6, 'UTC')}}"
        )
        since_text = format_timestamp(since).rstrip("Z").replace("T", " ")
        return {r[0] for r in self.ch.query(query, parameters={"since": since_text}).result_rows}


# ---------------------------------------------------------------------------------------------------------------
# The writer


def _is_transient_clickhouse(exc: BaseException) -> bool:
    return isinstance(exc, ch_errors.OperationalError | ch_errors.StreamFailureError | ConnectionError | OSError)


# ClickHouse errors that are about the values of the rows sent (so about one record), by error name. Every
# other server error (UNKNOWN_TABLE, TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED, TABLE_IS_READ_ONLY, READONLY,
# NOT_ENOUGH_SPACE, ...) concerns the table or the server and holds the batch.
CLICKHOUSE_ROW_ERRORS = frozenset(
    {
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_PARSE_QUOTED_STRING",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_ESCAPE_SEQUENCE",
        "CANNOT_READ_ARRAY_FROM_TEXT",
        "CANNOT_CONVERT_TYPE",
        "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
        "ARGUMENT_OUT_OF_BOUND",
        "DECIMAL_OVERFLOW",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        "TOO_LARGE_STRING_SIZE",
        "TOO_LARGE_ARRAY_SIZE",
        "INCORRECT_DATA",
        "TYPE_MISMATCH",
    }
)
_CLICKHOUSE_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
# Raised while clickhouse-connect serialises a value on the client: always about that value.
_CLIENT_VALUE_ERRORS = (ch_errors.DataError, TypeError, ValueError, AttributeError, OverflowError, struct.error)


def clickhouse_error_name(exc: BaseException) -> str | None:
    """The error name a ClickHouse server error carries ("... (UNKNOWN_TABLE)"), None when it has none."""
    names = _CLICKHOUSE_ERROR_NAME.findall(str(exc))
    return names[-1] if names else None


def clickhouse_fault(exc: BaseException) -> str:
    """Whether `exc` is about the values of the rows sent ("row") or the store refuses the write as such ("store")."""
    if isinstance(exc, _CLIENT_VALUE_ERRORS):
        return "row"
    if isinstance(exc, ch_errors.DatabaseError) and clickhouse_error_name(exc) in CLICKHOUSE_ROW_ERRORS:
        return "row"
    return "store"


def _clickhouse_store_error(target: str, exc: BaseException) -> TransientStoreError:
    if _is_transient_clickhouse(exc):
        return TransientStoreError(f"ClickHouse unavailable: {type(exc).__name__}: {exc}")
    name = clickhouse_error_name(exc) or type(exc).__name__
    return StoreRefusedError(f"ClickHouse refuses writes to {target} ({name}); holding the batch: {exc}")


@dataclass(frozen=True)
class _Block:
    """A batch's changes of one table read as columns, for one Arrow insert. `items` gives the same changes one
    by one: when ClickHouse refuses a value in the block, the rows at fault are found the row-by-row way."""

    table: SyncedTable
    rows: pa.Table
    items: Callable[[], list[WriteItem]]


@dataclass
class _Payload:
    rows: dict[str, list[tuple[WriteItem, list[Any]]]] = field(default_factory=lambda: defaultdict(list))
    blocks: list[_Block] = field(default_factory=list)


class ClickHouseWriter:
    # Mirrors hold the row as it is; search documents also show fields of other tables.
    enriched_rows = False
    # A mirror takes a batch's changes of a table as columns (`prepare_columns`): one Arrow insert, no row objects.
    takes_columns = True

    def __init__(self, client: ClickHouseClient, database: str = CLICKHOUSE_DATABASE):
        self.client = client
        self.database = database

    def _insert(self, table: SyncedTable, rows: list[list[Any]]) -> None:
        self.client.insert(f"{self.database}.{table.clickhouse_table}", rows, column_names=clickhouse_columns(table))

    def write(self, items: Sequence[WriteItem]) -> WriteOutcome:
        return self.send(self.prepare(items))

    def insert_json_rows(self, table: SyncedTable, columns: Sequence[str], block: bytes) -> bool:
        """Insert mirror rows already spelled as JSON arrays of the values of `columns`, one a line
        (`postgres.MirrorRecords`), parsed by ClickHouse (JSONCompactEachRow). False when it refused a value in the
        block: those rows are the row-by-row way's to write, where the ones at fault are isolated. A store that is
        down or refuses the write as such raises, as `send` does."""
        target = f"{self.database}.{table.clickhouse_table}"
        strict = {"input_format_null_as_default": 0, "input_format_skip_unknown_fields": 0}
        try:
            self.client.raw_insert(target, list(columns), insert_block=block, settings=strict, fmt="JSONCompactEachRow")
        except Exception as exc:
            if clickhouse_fault(exc) == "store":
                raise _clickhouse_store_error(target, exc) from exc
            return False
        return True

    def truncate(self, table: SyncedTable, version: int) -> int:
        """Every live row of the mirror older than `version` becomes a tombstone at `version` (a TRUNCATE)."""
        target = f"{self.database}.{table.clickhouse_table}"
        keys = ", ".join(backtick(table.column(k).target_name) for k in table.key)
        try:
            rows = self.client.query(
                f"SELECT {keys} FROM {target} FINAL WHERE version < {{v:UInt64}}", parameters={"v": version}
            ).result_rows
        except Exception as exc:
            raise _clickhouse_store_error(target, exc) from exc
        items = [WriteItem(table, dict(zip(table.key, r, strict=True)), version, True) for r in rows]
        return tombstones_written(self.write(items), target)

    def prepare(self, items: Sequence[WriteItem]) -> Prepared:
        """Transform (CPU only, no I/O): can run on another thread while the previous batch is sent."""
        out = WriteOutcome()
        payload = _Payload()
        for item in items:
            try:
                row = to_clickhouse_row(item.table, item.row, version=item.version, deleted=item.deleted)
            except (ValueError, TypeError, KeyError) as exc:
                out.poison.append((item, exc))
                continue
            # (Only after the transform: a table whose every row is refused must leave no empty batch to send.)
            payload.rows[item.table.name].append((item, row))
        return Prepared(out, payload)

    def prepare_columns(
        self,
        prepared: Prepared,
        changes: ChangeColumns,
        *,
        tombstones_below: int,
        items: Callable[[], list[WriteItem]],
    ) -> None:
        """Add a batch's changes of one table, read as columns, to what `prepare` made ready: one Arrow insert of
        the rows `items` would give one by one (see `transform.clickhouse_block`)."""
        rows = clickhouse_block(changes, tombstones_below=tombstones_below)
        prepared.payload.blocks.append(_Block(changes.table, rows, items))

    def send(self, prepared: Prepared) -> WriteOutcome:
        out, payload = prepared.outcome, prepared.payload
        for block in payload.blocks:
            target = f"{self.database}.{block.table.clickhouse_table}"
            try:
                self.client.insert_arrow(target, block.rows)
                out.written += block.rows.num_rows
                continue
            except Exception as exc:
                if clickhouse_fault(exc) == "store":
                    raise _clickhouse_store_error(target, exc) from exc
            # A value was refused: the row-by-row way isolates the rows at fault, for the DLQ.
            rest = self.send(self.prepare(block.items()))
            out.written += rest.written
            out.poison += rest.poison
        for pairs in payload.rows.values():
            table = pairs[0][0].table
            target = f"{self.database}.{table.clickhouse_table}"
            try:
                self._insert(table, [r for _, r in pairs])
                out.written += len(pairs)
                continue
            except Exception as exc:
                if clickhouse_fault(exc) == "store":
                    raise _clickhouse_store_error(target, exc) from exc
            # A value was refused: find the rows ClickHouse refuses on their own. A store-wide error met on the
            # way still holds the whole batch.
            for item, row in pairs:
                try:
                    self._insert(table, [row])
                    out.written += 1
                except Exception as exc:
                    if clickhouse_fault(exc) == "store":
                        raise _clickhouse_store_error(target, exc) from exc
                    out.poison.append((item, exc))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The schema: applied from `sql/clickhouse/`, checked against the catalog

SCHEMA_FILES = ("mirrors.sql", "aggregates.sql", "aggregates_staging.sql")


def apply_schema(client: ClickHouseClient) -> Iterator[str]:
    for name in SCHEMA_FILES:
        n = clickhouse_client.run_script(client, read_sql("clickhouse", name))
        yield f"clickhouse: applied sql/clickhouse/{name} ({n} statements)"
    for table in TABLES:
        done = ensure_stored_hash(client, table)
        yield done or f"clickhouse: {CLICKHOUSE_DATABASE}.{table.clickhouse_table}.{STORED_HASH_COLUMN} up to date"


# The mirror's type per catalog type (LowCardinality and Nullable unwrapped; Decimal's precision free).
MIRROR_TYPES = {
    "text": r"String",
    "int": r"Int32",
    "bigint": r"Int64",
    "bool": r"Bool|UInt8",
    "numeric": r"Decimal\(\d+, {scale}\)",
    "timestamptz": r"DateTime64\(6, 'UTC'\)",
    "text[]": r"Array\(String\)",
    "jsonb": r"String",
}


def _unwrap(ch_type: str) -> str:
    for wrapper in ("LowCardinality", "Nullable"):
        m = re.fullmatch(rf"{wrapper}\((.*)\)", ch_type)
        if m:
            ch_type = m.group(1)
    return _unwrap(ch_type) if ch_type.startswith(("LowCardinality(", "Nullable(")) else ch_type


def mirror_errors(table: SyncedTable, columns: Mapping[str, str], where: str | None = None) -> list[str]:
    """What in a mirror's `columns` (name -> ClickHouse type) contradicts the catalog. Used on the live mirror and
    on the DDL in `sql/clickhouse/` alike."""
    where = where or f"mirror {CLICKHOUSE_DATABASE}.{table.clickhouse_table}"
    if not columns:
        return [f"ClickHouse: {where} does not exist"]
    errors = []
    for c in table.columns:
        found = columns.get(c.target_name)
        pattern = MIRROR_TYPES[c.type].replace("{scale}", str(c.scale))
        if found is None:
            errors.append(f"ClickHouse: {where} has no column {c.target_name} (for {c.name})")
        elif not re.fullmatch(pattern, _unwrap(found)):
            errors.append(f"ClickHouse: {where}: {c.target_name} is {found}, expected {pattern}")
        elif c.nullable != found.replace("LowCardinality(", "").startswith("Nullable("):
            errors.append(f"ClickHouse: {where}: {c.target_name} is {found}, nullable must be {c.nullable}")
    for meta in (CLICKHOUSE_VERSION_COLUMN, CLICKHOUSE_DELETED_COLUMN):
        if meta not in columns:
            errors.append(f"ClickHouse: {where} has no {meta} column")
    return errors


def schema_errors(client: ClickHouseClient, table: SyncedTable, database: str = CLICKHOUSE_DATABASE) -> list[str]:
    rows = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": database, "t": table.clickhouse_table},
    ).result_rows
    return mirror_errors(table, {r[0]: r[1] for r in rows}, f"mirror {database}.{table.clickhouse_table}")


# ---------------------------------------------------------------------------------------------------------------
# Housekeeping: tombstones past the purge horizon, and what the mirrors hold on disk

PURGE_CHUNK = 10_000


def purge_tombstones(client: ClickHouseClient, table: SyncedTable, below_version: int) -> int:
    """Physically remove the keys whose newest row is a delete versioned below `below_version`, with every older
    row of those keys (which FINAL would otherwise show again). Rows of those keys at or above it (a key written
    again meanwhile) stay. Returns how many keys were removed."""
    [key] = [backtick(table.column(k).target_name) for k in table.key]
    key_type = CH_KEY_TYPES[table.column(table.key[0]).type]
    mirror = _mirror(table, CLICKHOUSE_DATABASE)
    version, deleted = backtick(CLICKHOUSE_VERSION_COLUMN), backtick(CLICKHOUSE_DELETED_COLUMN)
    # Only keys that have an old delete are grouped; a key is purged when its newest version is below the horizon
    # and no live row shares that version (a delete and a re-insert in one transaction may share it, and FINAL
    # then shows the one inserted last: the key may be live).
    keys = [
        r[0]
        for r in client.query(
            f"SELECT {key} FROM {mirror} WHERE {key} IN (SELECT {key} FROM {mirror} WHERE {deleted} = 1 "
            f"AND {version} < {{below:UInt64}}) GROUP BY {key} "
            f"HAVING max({version}) < {{below:UInt64}} AND maxIf({version}, {deleted} = 0) < max({version})",
            parameters={"below": below_version},
        ).result_rows
    ]
    for chunk in chunks(keys, PURGE_CHUNK):
        client.command(
            f"ALTER TABLE {mirror} DELETE WHERE {key} IN {{keys:Array({key_type})}} AND {version} < {{below:UInt64}}",
            parameters={"keys": chunk, "below": below_version},
            settings={"mutations_sync": 2},
        )
    return len(keys)


def storage(client: ClickHouseClient, table: SyncedTable) -> dict[str, int]:
    """What the mirror stores: rows (every version, tombstones included), tombstone rows, bytes on disk."""
    parts = client.query(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
        "WHERE database = {db:String} AND table = {t:String} AND active",
        parameters={"db": CLICKHOUSE_DATABASE, "t": table.clickhouse_table},
    ).result_rows[0]
    deleted = (
        f"SELECT count() FROM {_mirror(table, CLICKHOUSE_DATABASE)} WHERE {backtick(CLICKHOUSE_DELETED_COLUMN)} = 1"
    )
    return {
        "rows": int(parts[0] or 0),
        "tombstones": int(client.query(deleted).result_rows[0][0]),
        "bytes": int(parts[1] or 0),
    }


# ---------------------------------------------------------------------------------------------------------------
# The store


def newest_versions(client: ClickHouseClient, database: str = CLICKHOUSE_DATABASE) -> dict[str, int]:
    """The highest version in each mirror (0 when empty), tombstones included."""
    out = {}
    for t in TABLES:
        query = f"SELECT max({backtick(CLICKHOUSE_VERSION_COLUMN)}) FROM {_mirror(t, database)}"
        out[t.name] = int(client.query(query).result_rows[0][0] or 0)
    return out


class ClickHouseStore:
    """The analytics store: a mirror per synced table, rows exactly as PostgreSQL holds them."""

    name = "clickhouse"
    title = "ClickHouse"
    shape: Shape = "mirror"
    dlq_topic = "dlq-clickhouse-failed"
    # Changes a sink takes per batch: each insert makes a part on disk, so ClickHouse wants few large ones.
    batch_size = 20_000

    def holds(self, table: SyncedTable) -> bool:
        return True

    def location(self, table: SyncedTable) -> str:
        return f"{CLICKHOUSE_DATABASE}.{table.clickhouse_table}"

    @contextmanager
    def connect(self, settings: Settings) -> Iterator[ClickHouseClient]:
        with clickhouse_client.connection(settings.clickhouse_dsn) as client:
            yield client

    def writer(self, client: ClickHouseClient) -> ClickHouseWriter:
        return ClickHouseWriter(client)

    def side(
        self,
        client: ClickHouseClient,
        table: SyncedTable,
        *,
        full: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Side:
        # `full` computes every row's hash from its columns rather than summing the stored one.
        return ClickHouseSide(client, table, full=full)

    def newest_versions(self, client: ClickHouseClient) -> dict[str, int]:
        return newest_versions(client)

    def apply_schema(self, client: ClickHouseClient) -> Iterator[str]:
        return apply_schema(client)

    def schema_errors(self, client: ClickHouseClient, table: SyncedTable) -> list[str]:
        return schema_errors(client, table)

    def purge_tombstones(self, client: ClickHouseClient, table: SyncedTable, below_version: int) -> int:
        return purge_tombstones(client, table, below_version)

    def storage(self, client: ClickHouseClient, table: SyncedTable) -> dict[str, int]:
        return storage(client, table)

    def make_visible(self, client: ClickHouseClient, table: SyncedTable) -> None:
        """An insert is visible to the next query (FINAL merges at read time)."""


CLICKHOUSE = ClickHouseStore()
