"""One ConfigurableResource per system, configured from KNOWTON_* environment variables."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.health.alerts import AlertChannel, channels_from_settings
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcSink, SinkTurns

# Runs whose ops carry this pool never overlap (dagster.yaml: pools at run granularity, limit 1),
# because the embedded ClickHouse folder can be open in one process at a time.
CLICKHOUSE_POOL = "clickhouse"


class PostgresResource(dg.ConfigurableResource):
    """The source of truth."""

    host: str
    port: int
    dbname: str
    user: str
    password: str

    def conninfo(self) -> dict[str, object]:
        """Keyword arguments for `psycopg.connect`, for library code that opens its own connections."""
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
            "connect_timeout": 10,
            "application_name": "knowton-pipeline",
        }

    @contextmanager
    def get_connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        with psycopg.connect(**self.conninfo(), autocommit=autocommit) as conn:  # type: ignore[arg-type]
            yield conn


class KafkaResource(dg.ConfigurableResource):
    bootstrap_servers: str
    cdc_partitions: int = 3  # partitions of each cdc-* data topic (KNOWTON_CDC_PARTITIONS)


class KafkaConnectResource(dg.ConfigurableResource):
    url: str
    timeout_seconds: float = 10.0

    def get_client(self) -> KafkaConnectClient:
        return KafkaConnectClient(self.url, timeout=self.timeout_seconds)


class ClickHouseResource(dg.ConfigurableResource):
    """`chdb:///path` for the embedded engine (one process at a time), `http(s)://` for a server."""

    dsn: str

    @property
    def is_embedded(self) -> bool:
        return self.dsn.startswith("chdb://")

    def sink_turns(
        self, client: ClickHouseClient, kafka: KafkaResource, postgres: PostgresResource, *, every: float
    ) -> SinkTurns | None:
        """For a long run that holds the embedded engine (a backfill, a reconciliation, a repair): the ClickHouse
        sink, which cannot run beside it, takes a turn on `client` at most every `every` seconds when the run calls
        it between its steps. None with a ClickHouse server: its sink runs on its own."""
        if not self.is_embedded:
            return None
        sink = CdcSink(
            # A turn that meets an outage gives up soon: the run goes on, the changes wait in Kafka.
            ApplyConfig(bootstrap=kafka.bootstrap_servers, max_retry_seconds=10.0),
            store=CLICKHOUSE.name,
            client=client,
            pg_conninfo=postgres.conninfo(),
        )
        return SinkTurns(sink, every=every)

    @contextmanager
    def get_client(self) -> Iterator[ClickHouseClient]:
        with clickhouse.connection(self.dsn) as client:
            yield client


class ElasticsearchResource(dg.ConfigurableResource):
    url: str
    request_timeout: float = 30.0

    @contextmanager
    def get_client(self) -> Iterator[Elasticsearch]:
        es = Elasticsearch(self.url, request_timeout=self.request_timeout)
        try:
            yield es
        finally:
            es.close()


class AlertsResource(dg.ConfigurableResource):
    """Where alerts go: always the log, and the webhook of KNOWTON_ALERT_WEBHOOK_URL when it is set."""

    throttle_seconds: float = 900.0
    webhook_url: str | None = None  # read from the environment when left unset; never logged

    def channels(self, logger: Any) -> list[AlertChannel]:
        url = self.webhook_url if self.webhook_url is not None else os.environ.get("KNOWTON_ALERT_WEBHOOK_URL")
        return channels_from_settings(url or None, logger)


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "postgres": PostgresResource(
            host=dg.EnvVar("KNOWTON_PG_HOST"),
            port=dg.EnvVar.int("KNOWTON_PG_PORT"),
            dbname=dg.EnvVar("KNOWTON_PG_DB"),
            user=dg.EnvVar("KNOWTON_PG_USER"),
            password=dg.EnvVar("KNOWTON_PG_PASSWORD"),
        ),
        "kafka": KafkaResource(
            bootstrap_servers=dg.EnvVar("KNOWTON_KAFKA_BOOTSTRAP"),
            cdc_partitions=int(os.environ.get("KNOWTON_CDC_PARTITIONS", "3")),
        ),
        "kafka_connect": KafkaConnectResource(url=dg.EnvVar("KNOWTON_CONNECT_URL")),
        "clickhouse_store": ClickHouseResource(dsn=dg.EnvVar("KNOWTON_CLICKHOUSE_DSN")),
        "elasticsearch": ElasticsearchResource(url=dg.EnvVar("KNOWTON_ES_URL")),
        "alerts": AlertsResource(throttle_seconds=float(os.environ.get("KNOWTON_ALERT_THROTTLE_SECONDS", "900"))),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
