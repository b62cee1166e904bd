"""PostgreSQL, the source of truth: its spelling of canonical rows, the derived fields' SQL, and its reconcile side.

Every expression here is built with psycopg's `sql` module: identifiers from the catalog are quoted, values are
parameters. The functions in `sql/postgres/canonical.sql` (`ops.canonical_text_array`, `ops.canonical_jsonb`) must
be installed (`knowton schema apply`).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from knowton_pipeline.catalog import Column, DerivedField, SyncedTable
from knowton_pipeline.catalog import table as catalog_table
from knowton_pipeline.lib.canonical import Shape, key_columns, plan, segment_parameters
from knowton_pipeline.lib.reconcile.bisect import Checksum, Key, Segment, runs
from knowton_pipeline.lib.stores.base import (
    LINEAR_PARTS,
    RANGES_PER_QUERY,
    buckets,
    chunks,
    no_updated_at,
    short_starts,
    single_key,
    sum_by_day,
    text_prefix,
)
from knowton_pipeline.lib.transform import ES_METADATA_FIELDS, canonical_json_text, json_floats_all, plain_float

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


def key_range(table: SyncedTable, alias: str, lower_bound: bool, upper_bound: bool) -> sql.Composable:
    columns = key_columns(table)
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


# Relations standing in for the tables derived fields are computed from, by table name (scratch copies in tests).
Sources = Mapping[str, sql.Composable]


def derived_sql(field: DerivedField, alias: str = "t", *, sources: Sources | None = None) -> sql.Composed:
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


def canonical_sql(
    table: SyncedTable, alias: str = "t", *, shape: Shape = "mirror", sources: Sources | None = None
) -> sql.Composed:
    """An expression for the canonical string of the row `alias` (a row of `table`, or of a table shaped like it).
    For a search document the derived fields are computed from their source tables by the catalog's definition."""
    fields = [
        _postgres_spelling(f.column)(
            sql.Identifier(alias, f.column.name)
            if f.derived is None
            else derived_sql(f.derived, alias, sources=sources)
        )
        for f in plan(table, shape).fields
    ]
    return sql.Composed([sql.SQL("("), _PG_SEPARATOR.join(fields), sql.SQL(")")])


def hash_sql(
    table: SyncedTable, alias: str = "t", *, shape: Shape = "mirror", sources: Sources | None = None
) -> sql.Composed:
    """An expression for `row_hash` of the row `alias`, as bigint."""
    return sql.SQL("('x' || right(md5({}), 15))::bit(60)::bigint").format(
        canonical_sql(table, alias, shape=shape, sources=sources)
    )


def _relation(table: SyncedTable, relation: sql.Composable | None) -> sql.Composable:
    return relation if relation is not None else sql.Identifier(table.schema, table.name)


def segment_checksum_sql(
    table: SyncedTable,
    *,
    relation: sql.Composable | None = None,
    shape: Shape = "mirror",
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
        hash=hash_sql(table, "t", shape=shape, sources=sources),
        rel=_relation(table, relation),
        range=key_range(table, "t", lower_bound, upper_bound),
    )


def segment_rows_sql(
    table: SyncedTable,
    *,
    relation: sql.Composable | None = None,
    shape: Shape = "mirror",
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
        canonical=canonical_sql(table, "t", shape=shape, sources=sources),
        hash=hash_sql(table, "t", shape=shape, sources=sources),
        rel=_relation(table, relation),
        range=key_range(table, "t", lower_bound, upper_bound),
        order=sql.SQL(", ").join(keys),
    )


# PostgreSQL passes a function at most 100 arguments: the JSON of a wider row is built in parts of 100 (50 pairs of
# an object), joined as jsonb, which keeps each value as it is (numbers exact, strings unchanged).
MOST_FUNCTION_ARGUMENTS = 100


def _json_built(function: str, args: Sequence[sql.Composable]) -> sql.Composable:
    """`function(args)` (json_build_array, or json_build_object of key, value pairs), in parts when there are more
    arguments than PostgreSQL passes to one call."""
    step = MOST_FUNCTION_ARGUMENTS
    calls = [
        sql.SQL("{}({})").format(sql.SQL(function), sql.SQL(", ").join(args[i : i + step]))
        for i in range(0, max(len(args), 1), step)
    ]
    if len(calls) == 1:
        return calls[0]
    return sql.SQL("({})").format(sql.SQL(" || ").join(sql.SQL("{}::jsonb").format(call) for call in calls))


def mirror_rows_copy_sql(
    table: SyncedTable, where: sql.Composable, version: int, *, relation: sql.Composable | None = None
) -> sql.Composed:
    """A COPY that writes each row of `table` matching `where` (alias `t`) as one record that `MirrorRecords.line`
    turns into the mirror row, versioned at `version`, as `transform.to_clickhouse_row` spells it, as a JSON array
    of the values of `MirrorRecords.columns` (ClickHouse's JSONCompactEachRow).

    A record is the JSON array of every column but the jsonb ones, then the version and the deleted flag; then, for
    each jsonb column in catalog order, the byte 0x02 and the value as jsonb prints it (nothing for NULL). Python
    writes jsonb's canonical text about ten times faster than `ops.canonical_jsonb`. A value the transform refuses
    (a numeric with more digits than its scale, a text[] holding NULL or nested) is spelled as a string ClickHouse
    refuses in its place, so the row goes the row-by-row way and meets the same error there.

    The CSV quote and delimiter are bytes JSON text never holds raw, so a record is the JSON as built."""
    refused = sql.SQL("to_json('refused by the mirror transform'::text)")
    values: list[sql.Composable] = []
    jsonb: list[sql.Composable] = []
    for c in table.columns:
        v = sql.SQL("t.{}").format(sql.Identifier(c.name))
        if c.type == "numeric":
            exact = sql.SQL("round({v}, {s})").format(v=v, s=sql.Literal(c.scale or 0))
            value = sql.SQL("CASE WHEN {v} IS NULL THEN NULL WHEN {v} = {exact} THEN to_json({exact}) ELSE {r} END")
            values.append(value.format(v=v, exact=exact, r=refused))
        elif c.type == "timestamptz":
            values.append(sql.SQL("to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')").format(v))
        elif c.type == "text[]":
            values.append(
                sql.SQL(
                    # array_position raises on a nested array: the dimensions are tested first.
                    "CASE WHEN array_ndims({v}) > 1 THEN {r} WHEN array_position({v}, NULL) IS NOT NULL THEN {r} "
                    "ELSE to_json({v}) END"
                ).format(v=v, r=refused)
            )
        elif c.type == "jsonb":
            jsonb.append(v)
        else:  # text, int, bigint, bool: JSON spells them as ClickHouse reads them
            values.append(v)
    values += [sql.Literal(version), sql.Literal(0)]
    return sql.SQL(
        "COPY (SELECT {values}{jsonb} FROM {rel} AS t WHERE {where}) "
        "TO STDOUT (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    ).format(
        values=_json_built("json_build_array", values),
        jsonb=sql.SQL("").join(sql.SQL(", {}").format(v) for v in jsonb),
        rel=_relation(table, relation),
        where=where,
    )


class MirrorRecords:
    """Reads the records of `mirror_rows_copy_sql` for `table` (one key column)."""

    def __init__(self, table: SyncedTable):
        self.table = table
        plain = [c.target_name for c in table.columns if c.type != "jsonb"]
        self._jsonb = sum(1 for c in table.columns if c.type == "jsonb")
        # The mirror's columns in the order of a line's values.
        self.columns = [*plain, "version", "is_deleted", *(c.target_name for c in table.columns if c.type == "jsonb")]
        [key] = table.key
        self._key = plain.index(table.column(key).target_name)

    def line(self, record: bytes) -> bytes:
        """The record as the mirror's JSON line, its jsonb values as `transform.canonical_json` spells them.
        ValueError when the transform refuses one (the row then goes the row-by-row way, which says why)."""
        if not self._jsonb:
            return record
        head, *values = record.rstrip(b"\n").split(b"\x02")
        if len(values) != self._jsonb or not head.endswith(b"]"):
            raise ValueError(f"a COPY record of {self.table.name} does not have the mirror's layout")
        parts = [head[:-1]]
        for text in values:
            parts += [b",", b"null" if not text else orjson.dumps(canonical_json_text(text))]
        parts.append(b"]\n")
        return b"".join(parts)

    def key(self, record: bytes) -> Any:
        """The key of the row in a record (or in its line)."""
        return orjson.loads(record.split(b"\x02", 1)[0])[self._key]


# Derived field types a document carries as psycopg reads them and JSON spells them alike (see `document_rows_copy_sql`).
_DOCUMENT_DERIVED_TYPES = frozenset({"text", "int", "bigint", "bool"})


def documents_by_copy(table: SyncedTable) -> bool:
    """Whether PostgreSQL can spell `table`'s search documents (`document_rows_copy_sql`): one key column, which the
    document holds, and derived fields of types JSON spells as the enriched rows hold them (and not named like the
    metadata, which the document transform refuses)."""
    return (
        table.elasticsearch_index is not None
        and len(table.key) == 1
        and table.column(table.key[0]).in_elasticsearch
        and all(f.type in _DOCUMENT_DERIVED_TYPES and f.name not in ES_METADATA_FIELDS for f in table.derived)
    )


def document_rows_copy_sql(
    table: SyncedTable, where: sql.Composable, *, relation: sql.Composable | None = None, sources: Sources | None = None
) -> sql.Composed:
    """A COPY that writes each row of `table` matching `where` (alias `t`) as one record that `DocumentRecords.fields`
    turns into the search document's column and derived fields, as `transform.to_es_document` spells them from the
    enriched row (the writer adds the metadata and the hash).

    A record is `t` or `f`, the byte 0x02, then the fields as a JSON object. `f` marks a row holding a value the
    document transform refuses or this spelling does not cover (a NULL in a NOT NULL column, a numeric with more
    digits than its scale or not a number, a timestamp outside years 1 to 9999, a text[] holding NULL or nested): it
    goes the row-by-row way, which decides. Derived fields are computed once per row, by the catalog's definition."""
    if not documents_by_copy(table):
        raise ValueError(f"{table.name}: its search documents are not spelled by PostgreSQL (see documents_by_copy)")
    pairs: list[sql.Composable] = []
    checks: list[sql.Composable] = []
    for c in table.columns:
        if not c.in_elasticsearch:
            continue
        v = sql.SQL("t.{}").format(sql.Identifier(c.name))
        if c.type == "numeric":
            exact = sql.SQL("round({v}, {s})").format(v=v, s=sql.Literal(c.scale or 0))
            value: sql.Composable = sql.SQL("{}::text").format(exact)
            checks.append(
                sql.SQL("({v} IS NULL OR ({v} = {exact} AND {v} NOT IN ('NaN', 'Infinity', '-Infinity')))").format(
                    v=v, exact=exact
                )
            )
        elif c.type == "timestamptz":
            value = sql.SQL(_PG_TIMESTAMP).format(v=v)
            checks.append(
                sql.SQL(
                    "({v} IS NULL OR {v} >= '0001-01-01 00:00:00+00'::timestamptz "
                    "AND {v} < '10000-01-01 00:00:00+00'::timestamptz)"
                ).format(v=v)
            )
        elif c.type == "text[]":
            value = v
            checks.append(
                sql.SQL(
                    # array_position raises on a nested array: the dimensions are tested first.
                    "({v} IS NULL OR CASE WHEN coalesce(array_ndims({v}), 1) > 1 THEN false "
                    "ELSE array_position({v}, NULL) IS NULL END)"
                ).format(v=v)
            )
        else:  # text, int, bigint, bool and jsonb: JSON spells them as psycopg reads them (jsonb: see DocumentRecords)
            value = v
        if not c.nullable and c.type != "jsonb":  # NULL in a NOT NULL jsonb column is the JSON value null
            checks.append(sql.SQL("{} IS NOT NULL").format(v))
        pairs += [sql.Literal(c.target_name), value]
    inner = [sql.SQL("t.*")]
    for f in table.derived:
        inner.append(sql.SQL("{} AS {}").format(derived_sql(f, "t", sources=sources), sql.Identifier(f.name)))
        pairs += [sql.Literal(f.name), sql.SQL("t.{}").format(sql.Identifier(f.name))]
    ok = sql.SQL(" AND ").join(checks) if checks else sql.SQL("true")
    return sql.SQL(
        "COPY (SELECT CASE WHEN {ok} THEN 't' ELSE 'f' END, {document} "
        "FROM (SELECT {inner} FROM {rel} AS t WHERE {where}) AS t) "
        "TO STDOUT (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    ).format(
        ok=ok,
        document=_json_built("json_build_object", pairs),
        inner=sql.SQL(", ").join(inner),
        rel=_relation(table, relation),
        where=where,
    )


class DocumentRecords:
    """Reads the records of `document_rows_copy_sql` for `table`."""

    def __init__(self, table: SyncedTable):
        self.table = table
        self._jsonb = [c.target_name for c in table.columns if c.in_elasticsearch and c.type == "jsonb"]
        self._key = table.column(single_key(table)).target_name

    def fields(self, record: bytes) -> dict[str, Any]:
        """The document's column and derived fields, valued as `to_es_document` values them from the enriched row.
        ValueError for a row the COPY marked, or whose jsonb orjson might not read as psycopg's json.loads does (a
        float outside 1e-4..1e16, which takes in integers beyond 64 bits): the row then goes the row-by-row way."""
        flag, _, text = record.rstrip(b"\n").partition(b"\x02")
        if flag != b"t":
            raise ValueError(f"a row of {self.table.name} is left to the row-by-row transform")
        try:
            fields = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"a COPY record of {self.table.name} is not a JSON object") from exc
        for name in self._jsonb:
            if not json_floats_all(fields[name], plain_float):
                raise ValueError(f"a jsonb value of {self.table.name} is left to the row-by-row transform")
        return fields

    def key(self, record: bytes) -> Any:
        """The key of the row in a record (json reads what orjson does not: a number beyond a double)."""
        text = record.rstrip(b"\n").partition(b"\x02")[2]
        try:
            return orjson.loads(text)[self._key]
        except orjson.JSONDecodeError:
            return json.loads(text)[self._key]


def segment_checksum(
    conn: psycopg.Connection,
    table: SyncedTable,
    lo: Any = None,
    hi: Any = None,
    *,
    relation: sql.Composable | None = None,
    shape: Shape = "mirror",
    sources: Sources | None = None,
) -> tuple[int, int]:
    """(count, sum of row_hash) of the rows with key in [lo, hi), computed inside PostgreSQL."""
    query = segment_checksum_sql(
        table,
        relation=relation,
        shape=shape,
        sources=sources,
        lower_bound=lo is not None,
        upper_bound=hi is not None,
    )
    row = conn.execute(query, segment_parameters(table, lo, hi)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------------------------------------------------------
# The schema check

# What a catalog type is called by information_schema (data_type, or udt_name for arrays).
INFORMATION_SCHEMA_TYPES = {
    "text": "text",
    "int": "integer",
    "bigint": "bigint",
    "bool": "boolean",
    "numeric": "numeric",
    "timestamptz": "timestamp with time zone",
    "text[]": "_text",
    "jsonb": "jsonb",
}


def live_columns(conn: psycopg.Connection, table: SyncedTable) -> dict[str, tuple[str, int | None]]:
    """Column name -> (information_schema type, numeric scale) of the table as PostgreSQL has it now."""
    rows = conn.execute(
        "SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN udt_name ELSE data_type END, numeric_scale "
        "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (table.schema, table.name),
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def column_errors(table: SyncedTable, columns: Mapping[str, tuple[str, int | None]]) -> list[str]:
    """What in `columns` (as `live_columns` gives them) contradicts the catalog: a dropped or retyped column."""
    if not columns:
        return [f"PostgreSQL has no table {table.qualified_name}"]
    errors = []
    for c in table.columns:
        if c.name not in columns:
            errors.append(f"PostgreSQL: column {c.name} was dropped (the catalog syncs it as {c.type})")
            continue
        found, scale = columns[c.name]
        expected = INFORMATION_SCHEMA_TYPES[c.type]
        if found != expected or (c.type == "numeric" and scale != c.scale):
            shown = f"{found}({scale})" if found == "numeric" else found
            wanted = f"numeric(scale {c.scale})" if c.type == "numeric" else expected
            errors.append(f"PostgreSQL: column {c.name} is {shown}, the catalog expects {wanted}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# The reconcile side


@contextmanager
def parallel_aggregation(conn: psycopg.Connection, *, sort: bool = True) -> Iterator[None]:
    """Statements run here are planned with parallel workers whatever their size (and, `sort=False`, group by hash
    rather than by a sort); the session's settings are put back after."""
    settings = ("parallel_setup_cost", "parallel_tuple_cost", *(() if sort else ("enable_sort",)))
    conn.execute("SET parallel_setup_cost = 0")
    conn.execute("SET parallel_tuple_cost = 0")
    if not sort:
        conn.execute("SET enable_sort = off")
    try:
        yield
    finally:
        if conn.info.transaction_status in (TransactionStatus.IDLE, TransactionStatus.INTRANS):
            for name in settings:
                conn.execute(sql.SQL("RESET {}").format(sql.Identifier(name)))


class PostgresSide:
    """The source: a PostgreSQL table, its canonical rows spelled in the target's shape."""

    def __init__(self, conn: psycopg.Connection, table: SyncedTable, *, shape: Shape):
        self.conn, self.table, self.shape = conn, table, shape
        self.key = single_key(table)
        self.label = "postgresql"
        self.max_parts = 16384  # width_bucket finds a key's part by binary search
        self._rel = sql.Identifier(table.schema, table.name)
        self._key_type = sql.SQL(PG_KEY_TYPES[table.column(self.key).type])
        self._text = table.column(self.key).type == "text"
        self._key_expr = sql.SQL('t.{} COLLATE "C"' if table.column(self.key).type == "text" else "t.{}").format(
            sql.Identifier(self.key)
        )

    def _range(self, seg: Segment) -> sql.Composable:
        return key_range(self.table, "t", seg.lo is not None, seg.hi is not None)

    def day_checksums(self) -> dict[date | None, Checksum]:
        day = (
            sql.SQL("(t.{} AT TIME ZONE 'UTC')::date").format(sql.Identifier(self.table.created_at))
            if self.table.created_at
            else sql.SQL("NULL::date")
        )
        query = sql.SQL("SELECT {day} AS d, count(*), coalesce(sum({hash}), 0) FROM {rel} AS t GROUP BY 1").format(
            day=day, hash=hash_sql(self.table, "t", shape=self.shape), rel=self._rel
        )
        return sum_by_day(self.conn.execute(query).fetchall())

    def checksum(self, seg: Segment) -> Checksum:
        count, total = segment_checksum(self.conn, self.table, seg.lo, seg.hi, shape=self.shape)
        return Checksum(count, total)

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        return self.checksums_of(seg.split(points))

    def _runs(self, batch: Sequence[tuple[Segment, list[Segment]]]) -> tuple[sql.Composable, dict[str, Any]]:
        """A condition matching the keys in any of `batch`'s runs, and its parameters."""
        conditions: list[sql.Composable] = []
        params: dict[str, Any] = {}
        for i, (run, _) in enumerate(batch):
            bounds: list[sql.Composable] = []
            for name, value, op in ((f"lo{i}", run.lo, ">="), (f"hi{i}", run.hi, "<")):
                if value is not None:
                    bounds.append(
                        sql.SQL("{} {} {}::{}").format(
                            self._key_expr, sql.SQL(op), sql.Placeholder(name), self._key_type
                        )
                    )
                    params[name] = value
            conditions.append(sql.SQL("({})").format(sql.SQL(" AND ").join(bounds)) if bounds else sql.SQL("true"))
        return sql.SQL(" OR ").join(conditions), params

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        out: list[Checksum] = []
        for batch in chunks(parts, self.max_parts):
            if len(batch) == 1:
                out.append(self.checksum(batch[0]))
            elif not self._text or short_starts(batch):
                out += self._sums(batch)
            else:  # longer text starts: width_bucket searches them one by one, a few hundred at a time
                for piece in chunks(batch, LINEAR_PARTS):
                    out += self._sums(piece) if len(piece) > 1 else [self.checksum(piece[0])]
        return out

    def _sums(self, batch: Sequence[Segment]) -> list[Checksum]:
        """One grouped scan of `batch`'s runs: each row's part is the number of starts at or below its key. A part
        without a lower bound can only come first: its keys fall in bucket 0."""
        starts = [p.lo for p in batch if p.lo is not None]
        shift = 0 if batch[0].lo is None else 1
        params: dict[str, Any] = {"starts": starts}
        if not self._text:
            bucket = sql.SQL("width_bucket({k}, %(starts)s::{type}[])").format(k=self._key_expr, type=self._key_type)
        elif len(starts) > LINEAR_PARTS and short_starts(batch):
            # width_bucket searches a text array one element after the other, a bigint array by halves: with starts
            # of at most 8 bytes, searching the keys' and starts' first 8 bytes (`text_prefix`, shifted to a signed
            # order) is exact.
            prefix = sql.SQL(
                "(('x' || rpad(encode(substr(convert_to({k}, 'UTF8'), 1, 8), 'hex'), 16, '0'))::bit(64)::bigint"
                " # (-9223372036854775808)::bigint)"
            ).format(k=sql.SQL("t.{}").format(sql.Identifier(self.key)))
            bucket = sql.SQL("width_bucket({p}, %(prefixes)s::bigint[])").format(p=prefix)
            params["prefixes"] = [text_prefix(start) - 2**63 for start in starts]
        else:
            bucket = sql.SQL("width_bucket({k}, %(starts)s::text[])").format(k=self._key_expr)
        totals = [Checksum(0, 0)] * len(batch)
        for group in chunks(runs(batch), RANGES_PER_QUERY):  # each part is in one group: the sums add up
            where, ranges = self._runs(group)
            query = sql.SQL(
                "SELECT {bucket} - {shift} AS b, count(*), coalesce(sum({hash}), 0) FROM {rel} AS t "
                "WHERE {where} GROUP BY b"
            ).format(
                bucket=bucket,
                shift=sql.Literal(shift),
                hash=hash_sql(self.table, "t", shape=self.shape),
                rel=self._rel,
                where=where,
            )
            found_rows = buckets(self._grouped(query, {**ranges, **params}), len(batch))
            totals = [Checksum(x.count + y.count, x.total + y.total) for x, y in zip(totals, found_rows, strict=True)]
        return totals

    def _grouped(self, query: sql.Composable, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """A grouped checksum query, aggregated in parallel workers by hash (a sort of every row would cost a
        third of the scan again)."""
        with parallel_aggregation(self.conn, sort=False):
            return self.conn.execute(query, params).fetchall()

    def sample_keys(self, size: int) -> tuple[list[Key], int | None]:
        """About `size` keys drawn from the whole table by block sampling, and its estimated number of rows; None
        for that when the planner's estimate is missing or stale (the table holds more than 4 x `size` rows where
        it expected at most `size`): the sample is then the table's first pages, not the whole table."""
        found = self.conn.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (self._rel.as_string(self.conn),)
        ).fetchone()
        estimate = int(found[0]) if found is not None else -1
        percent = 100.0 if estimate <= size else max(0.001, 100.0 * size / estimate)
        query = sql.SQL("SELECT t.{key} FROM {rel} AS t TABLESAMPLE SYSTEM (%(percent)s) LIMIT %(limit)s").format(
            key=sql.Identifier(self.key), rel=self._rel
        )
        keys = [r[0] for r in self.conn.execute(query, {"percent": percent, "limit": 4 * size}).fetchall()]
        if percent == 100.0 and len(keys) == 4 * size:
            return keys, None  # a stale estimate: the whole table was asked for, and it holds more than that
        return keys, max(estimate, len(keys))

    def prefix_checksums(self, length: int) -> dict[str, Checksum]:
        """The checksum of the rows of each beginning of `length` characters (the whole key when shorter) that
        some key has: one grouped scan."""
        query = sql.SQL(
            'SELECT left(t.{key}, %(length)s) COLLATE "C" AS p, count(*), coalesce(sum({hash}), 0) FROM {rel} AS t '
            "GROUP BY p"
        ).format(key=sql.Identifier(self.key), hash=hash_sql(self.table, "t", shape=self.shape), rel=self._rel)
        return {p: Checksum(int(n), int(total)) for p, n, total in self._grouped(query, {"length": length})}

    def rows_of(self, segments: Sequence[Segment]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        for group in chunks(runs(segments), RANGES_PER_QUERY):
            where, params = self._runs(group)
            query = sql.SQL("SELECT t.{key}, {canonical} FROM {rel} AS t WHERE {where}").format(
                key=sql.Identifier(self.key),
                canonical=canonical_sql(self.table, "t", shape=self.shape),
                rel=self._rel,
                where=where,
            )
            out.update({r[0]: r[1] for r in self.conn.execute(query, params).fetchall()})
        return out

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        query = sql.SQL("SELECT min({k}), max({k}) FROM {rel} AS t WHERE {range}").format(
            k=self._key_expr, rel=self._rel, range=self._range(seg)
        )
        row = self.conn.execute(query, segment_parameters(self.table, seg.lo, seg.hi)).fetchone()
        return None if row is None or row[0] is None else (row[0], row[1])

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        step = max(1, math.ceil(count / parts))
        query = sql.SQL(
            "SELECT k FROM (SELECT t.{key} AS k, row_number() OVER (ORDER BY {order}) AS rn FROM {rel} AS t "
            "WHERE {range}) s WHERE rn %% %(step)s = 1 AND rn > 1 ORDER BY rn"
        ).format(key=sql.Identifier(self.key), order=self._key_expr, rel=self._rel, range=self._range(seg))
        params = {**segment_parameters(self.table, seg.lo, seg.hi), "step": step}
        return [r[0] for r in self.conn.execute(query, params).fetchall()]

    def rows(self, seg: Segment) -> dict[Key, str]:
        query = segment_rows_sql(
            self.table, shape=self.shape, lower_bound=seg.lo is not None, upper_bound=seg.hi is not None
        )
        rows = self.conn.execute(query, segment_parameters(self.table, seg.lo, seg.hi)).fetchall()
        return {r[0]: r[1] for r in rows}

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        query = sql.SQL("SELECT t.{key}, {canonical} FROM {rel} AS t WHERE t.{key} = ANY(%s)").format(
            key=sql.Identifier(self.key),
            canonical=canonical_sql(self.table, "t", shape=self.shape),
            rel=self._rel,
        )
        out: dict[Key, str] = {}
        for chunk in chunks(keys):
            out.update({r[0]: r[1] for r in self.conn.execute(query, (chunk,)).fetchall()})
        return out

    def changed_keys(self, since: datetime) -> set[Key]:
        if not self.table.updated_at:
            raise no_updated_at(self.table)
        query = sql.SQL("SELECT t.{key} FROM {rel} AS t WHERE t.{updated} >= %s").format(
            key=sql.Identifier(self.key), rel=self._rel, updated=sql.Identifier(self.table.updated_at)
        )
        return {r[0] for r in self.conn.execute(query, (since,)).fetchall()}
