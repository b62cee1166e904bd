"""The table catalog: every synced table declared once (docs/architecture.md, "Where things live").

Asset specs, topics, DDL checks and (later) transforms and reconciliation are derived from it.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

TOPIC_PREFIX = "cdc-"
# The ClickHouse database holding the mirrors and the aggregates.
CLICKHOUSE_DATABASE = "knowton"
DLQ_TOPICS = ("dlq-clickhouse-failed", "dlq-elasticsearch-failed", "dlq-parked")


# Column types the transforms, the Debezium decoder and (later) canonical hashing understand.
COLUMN_TYPES = ("text", "int", "bigint", "bool", "numeric", "timestamptz", "text[]", "jsonb")


@functools.cache
def snake(name: str) -> str:
    """PostgreSQL's camelCase column name as ClickHouse and Elasticsearch spell it (cached: the sinks ask for every
    field of every event)."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


@dataclass(frozen=True)
class Column:
    name: str  # as in PostgreSQL ("createdAt")
    type: str  # one of COLUMN_TYPES
    nullable: bool = False
    scale: int | None = None  # digits after the point, for numeric
    in_elasticsearch: bool = True

    def __post_init__(self) -> None:
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"column {self.name}: unknown type {self.type!r}")
        if (self.type == "numeric") != (self.scale is not None):
            raise ValueError(f"column {self.name}: numeric columns, and only they, need a scale")

    @property
    def target_name(self) -> str:
        """The column's name in ClickHouse and Elasticsearch."""
        return snake(self.name)


@dataclass(frozen=True)
class Dependency:
    """How a change of a row in another table reaches the documents a derived field is computed for: a row of
    `table` feeds the documents whose `row_column` equals its `column`. An update matters only when one of the
    `watch` columns, or `column` itself, changes (no `watch`: every change matters); an insert, a delete and a
    truncate always matter. This is what the sync follows to re-read exactly the documents a change touched."""

    table: str  # the other table ("User")
    column: str  # in that table ("address")
    row_column: str  # in the document's own table ("creator")
    watch: tuple[str, ...] = ()


@dataclass(frozen=True)
class DerivedField:
    """A search-document field computed from other tables (the creator's username, the sales count).

    `sql` is the one definition: a PostgreSQL expression for one row of the table, used by the writer's
    enrichment re-read and by the reconciliation's canonical row alike. In it `{row}` is that row's alias,
    `{Name}` for a table named in `depends` is that table, and any other `{name}` is the quoted identifier
    `name` (a column). Constants belong to the definition and are written in it. `depends` says how changes of
    those tables reach the documents (see `Dependency`).
    """

    name: str  # in the document, and in the enriched rows ("creator_username")
    type: str  # one of COLUMN_TYPES
    nullable: bool
    depends: tuple[Dependency, ...]
    sql: str
    scale: int | None = None

    def __post_init__(self) -> None:
        if snake(self.name) != self.name:
            raise ValueError(f"derived field {self.name}: a document field name is snake_case")
        if not self.depends:
            raise ValueError(f"derived field {self.name}: it depends on no other table; make it a column instead")
        placeholders = {f for _, f, _, _ in string.Formatter().parse(self.sql) if f is not None}
        if "row" not in placeholders:
            raise ValueError(f"derived field {self.name}: its SQL never refers to the row ({{row}})")
        unused = set(self.sources) - placeholders
        if unused:
            raise ValueError(f"derived field {self.name}: tables {sorted(unused)} it depends on are not in its SQL")
        _ = self.column  # a Column checks the type and the scale

    @property
    def sources(self) -> tuple[str, ...]:
        """The tables it is computed from."""
        return tuple(dict.fromkeys(d.table for d in self.depends))

    @property
    def column(self) -> Column:
        """The field as a column of the document: what canonical spelling and reading back go by."""
        return Column(self.name, self.type, nullable=self.nullable, scale=self.scale)


@dataclass(frozen=True)
class SyncedTable:
    name: str  # the PostgreSQL table, as Debezium and the seed name it ("User")
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    clickhouse_table: str  # mirror table in the `knowton` ClickHouse database
    elasticsearch_index: str | None  # alias searched by the application, None when not indexed
    description: str
    schema: str = "public"
    created_at: str | None = "createdAt"
    updated_at: str | None = "updatedAt"
    # Aggregates (ClickHouse tables) computed from this table's mirror.
    feeds: tuple[str, ...] = ()
    # Fields its search document adds from other tables; not in the mirror.
    derived: tuple[DerivedField, ...] = ()

    def __post_init__(self) -> None:
        if self.derived and self.elasticsearch_index is None:
            raise ValueError(f"{self.name}: derived fields need a search index to live in")
        taken = {c.target_name for c in self.columns}
        clashes = sorted(taken.intersection(f.name for f in self.derived))
        if clashes:
            raise ValueError(f"{self.name}: derived fields {clashes} clash with column names")
        names = {c.name for c in self.columns}
        for f in self.derived:
            for d in f.depends:
                if d.row_column not in names:
                    raise ValueError(
                        f"{self.name}.{f.name}: depends on {d.table} through {d.row_column!r}, not a column"
                    )

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")

    @property
    def dependencies(self) -> tuple[Dependency, ...]:
        """How changes of other tables reach this table's search documents, one entry per other table and path."""
        return tuple(dict.fromkeys(d for f in self.derived for d in f.depends))

    @property
    def topic(self) -> str:
        """Kafka topic Debezium's RegexRouter sends this table's change events to."""
        return f"{TOPIC_PREFIX}{self.name}"

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


TABLES: tuple[SyncedTable, ...] = (
    SyncedTable(
        name="User",
        key=("address",),
        columns=(
            Column("address", "text"),
            Column("username", "text"),
            Column("email", "text", nullable=True),
            Column("bio", "text", nullable=True),
            Column("avatarUrl", "text", nullable=True),
            Column("reputation", "int"),
            Column("isVerified", "bool"),
            Column("createdAt", "timestamptz"),
            Column("updatedAt", "timestamptz"),
        ),
        clickhouse_table="users",
        elasticsearch_index="knowton-users",
        description="KnowTon accounts, keyed by wallet address.",
        feeds=("user_activity",),
    ),
    SyncedTable(
        name="Content",
        key=("id",),
        columns=(
            Column("id", "bigint"),
            Column("creator", "text"),
            Column("title", "text"),
            Column("description", "text", nullable=True),
            Column("category", "text"),
            Column("tags", "text[]"),
            Column("price", "numeric", scale=2),
            Column("status", "text"),
            Column("metadata", "jsonb"),
            Column("createdAt", "timestamptz"),
            Column("updatedAt", "timestamptz"),
        ),
        clickhouse_table="contents",
        elasticsearch_index="knowton-contents",
        description="Published and draft content items with their price and creator.",
        feeds=("user_activity", "content_sales_daily"),
        derived=(
            # NULL when the creator has no User row (the foreign key forbids it; the definition does not rely on it).
            DerivedField(
                name="creator_username",
                type="text",
                nullable=True,
                depends=(Dependency("User", "address", "creator", watch=("username",)),),
                sql="(SELECT u.{username} FROM {User} AS u WHERE u.{address} = {row}.{creator})",
            ),
            # Served by the partial index "Purchase_completed_contentId_idx" (an index-only count per row).
            DerivedField(
                name="sales_count",
                type="bigint",
                nullable=False,
                depends=(Dependency("Purchase", "contentId", "id"),),
                sql=(
                    "(SELECT count(*) FROM {Purchase} AS p "
                    "WHERE p.{contentId} = {row}.{id} AND p.{status} = 'completed')"
                ),
            ),
        ),
    ),
    SyncedTable(
        name="Purchase",
        key=("id",),
        columns=(
            Column("id", "bigint"),
            Column("contentId", "bigint"),
            Column("buyer", "text"),
            Column("amount", "numeric", scale=6),
            Column("currency", "text"),
            Column("txHash", "text", nullable=True),
            Column("status", "text"),
            Column("createdAt", "timestamptz"),
            Column("updatedAt", "timestamptz"),
        ),
        clickhouse_table="purchases",
        elasticsearch_index=None,
        description="Purchases of content by users, with amount, currency and on-chain transaction hash.",
        feeds=("user_activity", "content_sales_daily"),
    ),
)

# Debezium's heartbeat.action.query writes this row; it flows like a table so end-to-end lag is measurable.
HEARTBEAT = SyncedTable(
    name="heartbeat",
    schema="ops",
    key=("id",),
    columns=(Column("id", "int"), Column("ts", "timestamptz")),
    clickhouse_table="cdc_heartbeat",
    elasticsearch_index=None,
    description="Debezium heartbeat row, upserted every few seconds to keep the slot moving.",
    created_at=None,
    updated_at=None,
)

CDC_TABLES: tuple[SyncedTable, ...] = (*TABLES, HEARTBEAT)


class UnknownTableError(KeyError):
    def __str__(self) -> str:
        return f"unknown table {self.args[0]!r}; synced tables are: {', '.join(t.name for t in TABLES)}"


def table(name: str) -> SyncedTable:
    for t in CDC_TABLES:
        if t.name == name:
            return t
    raise UnknownTableError(name)


_FED_BY: dict[str, tuple[tuple[SyncedTable, ...], tuple[tuple[SyncedTable, Dependency], ...]]] = {}


def documents_fed_by(name: str) -> tuple[tuple[SyncedTable, Dependency], ...]:
    """The tables whose search documents show fields computed from table `name`, with how they are linked (asked
    once per change a sink applies, so kept as long as the catalog's tables are the same)."""
    entry = _FED_BY.get(name)
    if entry is None or entry[0] is not TABLES:
        entry = (TABLES, tuple((t, d) for t in TABLES for d in t.dependencies if d.table == name))
        _FED_BY[name] = entry
    return entry[1]


def topic_partitions(cdc_partitions: int) -> dict[str, int]:
    """Every topic of the pipeline with its partitions: each data topic `cdc_partitions` (keyed by primary key, so
    one row's changes stay in order in one partition); the heartbeat and the DLQs one."""
    data = {t.topic: cdc_partitions for t in CDC_TABLES if t is not HEARTBEAT}
    return {**data, HEARTBEAT.topic: 1, **dict.fromkeys(DLQ_TOPICS, 1)}
