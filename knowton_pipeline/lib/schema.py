"""Apply the schemas of all three stores from `sql/`: idempotent, safe to run on every start."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import psycopg
from elasticsearch import Elasticsearch
from psycopg import sql

from knowton_pipeline.catalog import all_topics
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.kafka_topics import ensure_topics
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import SQL_ROOT, read_json, read_sql

POSTGRES_FILES = ("schema.sql", "enable-cdc.sql", "ops.sql", "canonical.sql")
CLICKHOUSE_FILES = ("mirrors.sql", "aggregates.sql", "aggregates_staging.sql")
CDC_ROLE = "knowton_cdc"
STORES = ("postgres", "kafka", "clickhouse", "elasticsearch")


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


def apply_clickhouse(settings: Settings) -> Iterator[str]:
    with clickhouse.connection(settings.clickhouse_dsn) as client:
        for name in CLICKHOUSE_FILES:
            n = clickhouse.run_script(client, read_sql("clickhouse", name))
            yield f"clickhouse: applied sql/clickhouse/{name} ({n} statements)"


def elasticsearch_templates() -> dict[str, Path]:
    """Index name (the alias searches use) -> its template file."""
    return {
        p.name.removesuffix(".template.json"): p for p in sorted((SQL_ROOT / "elasticsearch").glob("*.template.json"))
    }


def alias_body() -> dict[str, object]:
    """Searches through the alias never see soft-deleted documents (deletes are kept as versioned
    tombstones so that a stale write cannot resurrect them after Elasticsearch's gc_deletes window)."""
    return {"is_write_index": True, "filter": {"bool": {"must_not": {"term": {"is_deleted": True}}}}}


def apply_elasticsearch(es: Elasticsearch) -> Iterator[str]:
    for alias, path in elasticsearch_templates().items():
        body = read_json("elasticsearch", path.name)
        es.indices.put_index_template(name=alias, **body)
        yield f"elasticsearch: index template {alias} ({path.name})"
        if es.indices.exists_alias(name=alias):
            # Converge existing indices: additive mapping changes and the alias definition.
            for index in es.indices.get_alias(name=alias):
                es.indices.put_mapping(index=index, properties=body["template"]["mappings"]["properties"])
                es.indices.put_alias(index=index, name=alias, **alias_body())
            continue
        if es.indices.exists(index=alias):
            raise RuntimeError(
                f"Elasticsearch has a concrete index named {alias!r} (probably auto-created by a write before the "
                f"schema was applied); searches expect an alias of that name over {alias}-v1. Reindex it into "
                f"{alias}-v1 and delete it, then apply again."
            )
        es.indices.create(index=f"{alias}-v1", aliases={alias: alias_body()})
        yield f"elasticsearch: created {alias}-v1 behind alias {alias}"


def apply_all(settings: Settings, stores: Iterable[str] | None = None) -> Iterator[str]:
    chosen = list(stores or STORES)
    unknown = [s for s in chosen if s not in STORES]
    if unknown:
        raise ValueError(f"unknown store(s) {', '.join(unknown)}; choose from {', '.join(STORES)}")
    if "postgres" in chosen:
        yield from apply_postgres(settings)
    if "kafka" in chosen:
        created = ensure_topics(settings.kafka_bootstrap, all_topics())
        yield f"kafka: topics {', '.join(all_topics())} present ({len(created)} created)"
    if "clickhouse" in chosen:
        yield from apply_clickhouse(settings)
    if "elasticsearch" in chosen:
        es = Elasticsearch(settings.es_url, request_timeout=30)
        try:
            yield from apply_elasticsearch(es)
        finally:
            es.close()
