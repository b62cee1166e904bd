"""`apply_schemas`: apply the DDL, CDC setup, topics and index templates of every store (idempotent)."""

import dagster as dg

from knowton_pipeline.catalog import topic_partitions
from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaResource,
    PostgresResource,
)
from knowton_pipeline.lib import schema
from knowton_pipeline.lib.kafka_topics import ensure_topics
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH


@dg.op(description="Apply sql/postgres/schema.sql and enable-cdc.sql (publication, slot, views, role).")
def apply_postgres_schema(context: dg.OpExecutionContext, postgres: PostgresResource) -> None:
    with postgres.get_connection(autocommit=True) as conn:
        for name in schema.POSTGRES_FILES:
            conn.execute(read_sql("postgres", name).encode())
            context.log.info(f"applied sql/postgres/{name}")


@dg.op(description="Create the cdc-* and DLQ topics if missing; give cdc-* topics the partitions configured.")
def create_kafka_topics(context: dg.OpExecutionContext, kafka: KafkaResource) -> None:
    created, grown = ensure_topics(kafka.bootstrap_servers, topic_partitions(kafka.cdc_partitions))
    context.log.info(f"topics created: {created or 'none (all present)'}; given more partitions: {grown or 'none'}")


@dg.op(pool=CLICKHOUSE_POOL, description="Apply sql/clickhouse/*.sql: the mirror and aggregate tables.")
def apply_clickhouse_schema(context: dg.OpExecutionContext, clickhouse_store: ClickHouseResource) -> None:
    with clickhouse_store.get_client() as client:
        for line in CLICKHOUSE.apply_schema(client):
            context.log.info(line)


@dg.op(description="Put the index templates and create the versioned indices behind their aliases.")
def apply_elasticsearch_schema(context: dg.OpExecutionContext, elasticsearch: ElasticsearchResource) -> None:
    with elasticsearch.get_client() as es:
        for line in ELASTICSEARCH.apply_schema(es):
            context.log.info(line)


@dg.job(description="Apply every store's schema (idempotent): PostgreSQL, Kafka topics, ClickHouse, Elasticsearch.")
def apply_schemas() -> None:
    apply_postgres_schema()
    create_kafka_topics()
    apply_clickhouse_schema()
    apply_elasticsearch_schema()
