"""cdc_lag_sensor and dlq_sensor against the real stack and a real Dagster instance."""

from __future__ import annotations

import json
from collections.abc import Callable

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Producer
from elasticsearch import Elasticsearch

from knowton_pipeline.defs.dlq.replay import dlq_sensor
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.defs.sync.apply_cdc import cdc_lag_sensor
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.replay import DlqReplayer, ReplayConfig
from knowton_pipeline_tests.helpers import insert_user, wait_for_cdc


def test_cdc_lag_sensor_skips_when_caught_up_and_requests_apply_cdc_when_rows_wait(
    caught_up: None, apply: Callable[[], ApplyStats], settings: Settings, pg: psycopg.Connection
) -> None:
    resources = build_resources()
    with dg.instance_for_test() as instance:
        idle = cdc_lag_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not idle.run_requests
        assert "no data lag" in (idle.skip_reason.skip_message if idle.skip_reason else "")  # type: ignore[union-attr]

        insert_user(pg)
        wait_for_cdc(settings)
        ctx = dg.build_sensor_context(instance=instance, resources=resources, cursor="7")
        busy = cdc_lag_sensor(ctx)
        assert [r.run_key for r in busy.run_requests] == ["apply-cdc-8"]  # type: ignore[union-attr]
        assert int(busy.run_requests[0].tags["knowton/cdc_lag"]) >= 1  # type: ignore[index,union-attr]
        assert json.loads(busy.cursor or "") == {"requested": 8}  # "7" was the earlier format: carried over
    apply()


def test_dlq_sensor_records_depth_and_requests_a_replay_when_a_dlq_has_records(
    caught_up: None, settings: Settings, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    resources = build_resources()
    with dg.instance_for_test() as instance:
        # Drain what earlier tests left (records not yet due stay, so compare depths, not zero).
        DlqReplayer(
            ReplayConfig(bootstrap=settings.kafka_bootstrap, ignore_backoff=True, max_attempts=1),
            clickhouse=ch,
            es=es,
            pg_conninfo=settings.pg_conninfo(),
        ).run(max_seconds=60)
        empty = dlq_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not empty.run_requests
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        producer.produce("dlq-clickhouse-failed", key=b"k", value=b"{}", headers=[(dlq.H_TOPIC, b"cdc-User")])
        producer.flush(10)
        result = dlq_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.run_key for r in result.run_requests] == ["reprocess-dlq-1"]  # type: ignore[union-attr]
        observed = {e.asset_key.path[-1]: e.metadata for e in result.asset_events}  # type: ignore[union-attr]
        assert observed["dlq-clickhouse-failed"]["dlq_depth"].value == 1
        assert "parked_unresolved" in observed["dlq-parked"]
