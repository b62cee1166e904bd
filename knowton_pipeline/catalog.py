"""The table catalog: every synced table declared once (DESIGN.md principle 1).

Asset specs, topics, DDL checks and (later) transforms and reconciliation are derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass

TOPIC_PREFIX = "cdc-"
DLQ_TOPICS = ("dlq-clickhouse-failed", "dlq-elasticsearch-failed", "dlq-parked")


@dataclass(frozen=True)
class SyncedTable:
    name: str  # the PostgreSQL table, as Debezium and the seed name it ("User")
    key: tuple[str, ...]
    clickhouse_table: str  # mirror table in the `knowton` ClickHouse database
    elasticsearch_index: str | None  # alias searched by the application, None when not indexed
    description: str
    schema: str = "public"
    created_at: str | None = "createdAt"
    updated_at: str | None = "updatedAt"

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
        clickhouse_table="users",
        elasticsearch_index="knowton-users",
        description="KnowTon accounts, keyed by wallet address.",
    ),
    SyncedTable(
        name="Content",
        key=("id",),
        clickhouse_table="contents",
        elasticsearch_index="knowton-contents",
        description="Published and draft content items with their price and creator.",
    ),
    SyncedTable(
        name="Purchase",
        key=("id",),
        clickhouse_table="purchases",
        elasticsearch_index=None,
        description="Purchases of content by users, with amount, currency and on-chain transaction hash.",
    ),
)

# Debezium's heartbeat.action.query writes this row; it flows like a table so end-to-end lag is measurable.
HEARTBEAT = SyncedTable(
    name="heartbeat",
    schema="ops",
    key=("id",),
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


def all_topics() -> list[str]:
    return [t.topic for t in CDC_TABLES] + list(DLQ_TOPICS)
