"""Apply the schemas of every store from `sql/`, and create the Kafka topics: idempotent, safe to run on every start.

PostgreSQL's is applied here; each target store applies its own (`TargetStore.apply_schema`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import psycopg
from psycopg import sql

from knowton_pipeline.catalog import topic_partitions
from knowton_pipeline.lib.kafka_topics import ensure_topics
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores import TARGETS

POSTGRES_FILES = ("schema.sql", "enable-cdc.sql", "ops.sql", "canonical.sql")
CDC_ROLE = "knowton_cdc"
STORES = ("postgres", "kafka", *TARGETS)


def apply_postgres(settings: Settings) -> Iterator[str]:
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        for name in POSTGRES_FILES:
            # One simple-protocol string per file; enable-cdc.sql creates its slot first, before any write.
            conn.execute(read_sql("postgres", name).encode())
            yield f"postgres: applied sql/postgres/{name}"
        conn.execute(
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(CDC_ROLE), sql.Literal(settings.cdc_password)
            )
        )
        yield f"postgres: password of role {CDC_ROLE} set from KNOWTON_CDC_PASSWORD"


def apply_all(settings: Settings, stores: Iterable[str] | None = None) -> Iterator[str]:
    chosen = list(stores or STORES)
    unknown = [s for s in chosen if s not in STORES]
    if unknown:
        raise ValueError(f"unknown store(s) {', '.join(unknown)}; choose from {', '.join(STORES)}")
    if "postgres" in chosen:
        yield from apply_postgres(settings)
    if "kafka" in chosen:
        topics = topic_partitions(int(settings["KNOWTON_CDC_PARTITIONS"]))
        created, grown = ensure_topics(settings.kafka_bootstrap, topics)
        yield (
            f"kafka: topics {', '.join(topics)} present ({len(created)} created, {len(grown)} given more partitions; "
            f"{settings['KNOWTON_CDC_PARTITIONS']} per cdc-* data topic)"
        )
    for store in TARGETS.values():
        if store.name in chosen:
            with store.connect(settings) as client:
                yield from store.apply_schema(client)
