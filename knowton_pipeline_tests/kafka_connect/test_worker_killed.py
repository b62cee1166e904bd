"""A Kafka Connect worker killed outright (SIGKILL, no flush, no clean shutdown) while rows are written, then started
again: Debezium resumes from the offsets Connect last flushed and the slot, so every change reaches both stores,
at most some twice (harmless: writes are versioned), and nothing goes to a DLQ."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import (
    CDC_CONNECTOR,
    assert_reconciled,
    ch_row,
    es_source,
    insert_user,
    topic_size,
    wait_for,
)


def test_a_connect_worker_killed_mid_stream_and_started_again_loses_no_change(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    stack: Stack,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    dlq_before = {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()}
    written: list[str] = []
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                written.append(insert_user(conn))
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(2)
        record = stack.record(stack.components["connect"])
        assert record is not None
        os.killpg(record.pid, signal.SIGKILL)
        wait_for(lambda: stack.record(stack.components["connect"]) is None, timeout=30, what="the worker gone")
        time.sleep(3)  # writes go on while no worker reads the slot
        stack.up(["connect"])
        client = KafkaConnectClient(settings.connect_url)
        wait_for(
            lambda: (
                (st := client.status(CDC_CONNECTOR) or {}).get("connector", {}).get("state") == "RUNNING"
                and all(t["state"] == "RUNNING" for t in st.get("tasks", []))
            ),
            timeout=120,
            what="the connector and its task RUNNING again",
        )
        time.sleep(2)
    finally:
        stop.set()
        writer.join()
    apply()
    assert len(written) > 50
    for address in written:
        assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None, address
        assert es_source(es, "knowton-users", address) is not None, address
    assert_reconciled(settings, ch, es, "User", written)
    assert {t: topic_size(settings, t) for t in dlq.TARGET_DLQ.values()} == dlq_before
