"""End-to-end lag that cannot be masked, on the real stack: a data topic left behind shows in the lag check
while heartbeats keep being applied."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import HEARTBEAT
from knowton_pipeline.lib.health.replication import applied_heartbeat
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.sync.apply import sink_group
from knowton_pipeline_tests.helpers import (
    assert_reconciled,
    insert_content,
    insert_purchase,
    insert_user,
    make_applier,
    wait_for_cdc,
)
from knowton_pipeline_tests.postgres.test_replication import _verdict, run_checks


def test_a_data_topic_kept_behind_shows_in_the_lag_while_heartbeats_flow(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    creator, buyer = insert_user(pg), insert_user(pg)
    content = insert_content(pg, creator)
    wait_for_cdc(settings)
    make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=120)
    purchases = [insert_purchase(pg, content, buyer) for _ in range(3)]
    wait_for_cdc(settings)
    time.sleep(12)
    # The consumer keeps applying heartbeats (as a fetch of small heartbeats does while a data partition is
    # megabytes behind) and never gets to cdc-Purchase.
    make_applier(settings, ch, es, topics=(HEARTBEAT.topic,)).run(until_caught_up=True, max_seconds=60)
    for store in TARGETS:
        heartbeat = applied_heartbeat(settings.kafka_bootstrap, sink_group(store))
        assert (datetime.now(UTC) - heartbeat).total_seconds() < 9, "the heartbeat alone says it is fresh"  # type: ignore[operator]

    checks = run_checks(dg.DagsterInstance.ephemeral(), lag_warn_seconds=9.0, lag_error_seconds=10.0)
    for store in TARGETS:
        lag = checks[f"end_to_end_lag_{store}"]
        assert _verdict(lag) == "error" and "cdc-Purchase" in lag.description
        assert lag.metadata["lag_seconds:cdc-Purchase"].value >= 12
        assert lag.metadata["lag_seconds:cdc-User"].value == 0

    make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=120)
    checks = run_checks(dg.DagsterInstance.ephemeral())
    for store in TARGETS:
        healthy = checks[f"end_to_end_lag_{store}"]
        assert _verdict(healthy) == "ok" and healthy.metadata["lag_seconds:cdc-Purchase"].value == 0
    assert_reconciled(settings, ch, es, "Purchase", purchases)
