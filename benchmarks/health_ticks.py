"""Sensor tick cost against the raw reads each tick wraps, measured in the same run.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/health_ticks.py [--ticks 50]

Needs the stack up (`knowton stack up`) with the connector deployed. Nothing is written to any store;
alerts go to the log only. For each sensor it times, alternating so drift hits both alike:
  connector_health_sensor  one full tick (status, deployed configs, diff against connectors/, decisions)
      raw                  `GET /connectors?expand=status&expand=info` alone, on a kept-alive session
  replication_lag_sensor   one full tick (slot query, idle transactions, per cdc-* topic the sync group's
                           committed offset and the partition's end, the oldest unapplied record's time
                           when a topic is behind, decisions)
      raw                  the `pg_replication_slots` and `pg_stat_activity` queries on an open
                           connection, plus the committed offsets and ends of the cdc-* partitions
  applied heartbeat        `applied_heartbeat` reading the time the apply stored with its commit
      fetch                the same for a scratch group whose offset carries no time, so the record
                           itself is fetched (what every tick cost before the apply stored it)
The figures are medians and means in milliseconds and the ratios tick/raw; the issue's bound is a tick
well under a second while Connect answers.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import dagster as dg
import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from knowton_pipeline.catalog import CDC_TABLES, HEARTBEAT
from knowton_pipeline.defs.kafka_connect.health import ConnectorHealthPolicy, connector_health_sensor
from knowton_pipeline.defs.postgres.replication import ReplicationThresholds, replication_lag_sensor
from knowton_pipeline.defs.resources import AlertsResource, KafkaConnectResource, build_resources
from knowton_pipeline.lib.health.replication import applied_heartbeat
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import committed_timestamp, sink_group


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    settings = Settings.from_env()
    resources = build_resources()
    # One instance for every tick, as in the daemon (a fresh ephemeral instance per tick costs ~50 ms).
    instance = dg.DagsterInstance.ephemeral()
    alerts = AlertsResource(webhook_url="")  # the log only

    def ticking(sensor: dg.SensorDefinition, sensor_resources: dict[str, Any]) -> Callable[[], None]:
        """One tick of `sensor` per call, each carrying on from the cursor of the one before."""
        cursor: list[str | None] = [None]

        def tick() -> None:
            context = dg.build_sensor_context(cursor=cursor[0], instance=instance, resources=sensor_resources)
            cursor[0] = sensor(context).cursor  # type: ignore[union-attr]

        return tick

    connect_tick = ticking(
        connector_health_sensor,
        {
            "kafka_connect": KafkaConnectResource(url=settings.connect_url),
            "alerts": alerts,
            "connector_health_policy": ConnectorHealthPolicy(),
        },
    )
    lag_tick = ticking(
        replication_lag_sensor,
        {
            "postgres": resources["postgres"],
            "kafka": resources["kafka"],
            "alerts": alerts,
            "replication_thresholds": ReplicationThresholds(),
        },
    )
    client = KafkaConnectClient(settings.connect_url)
    conn = psycopg.connect(**settings.pg_conninfo(), autocommit=True)  # type: ignore[arg-type]

    def lag_raw() -> None:
        # What the tick reads, raw: the slot, the sessions idle in a transaction, and per cdc-* topic the
        # group's committed offset and the end of the partition.
        conn.execute(
            "SELECT active, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) "
            "FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot'"
        ).fetchone()
        conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%%'"
        ).fetchall()
        consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": sink_group("clickhouse")})
        try:
            parts = [TopicPartition(t.topic, 0) for t in CDC_TABLES]
            for tp in consumer.committed(parts, timeout=5.0):
                consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
        finally:
            consumer.close()

    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": sink_group("clickhouse")})
    [committed] = probe.committed([TopicPartition(HEARTBEAT.topic, 0)], timeout=10)
    probe.close()
    if committed_timestamp(committed) is None:
        print(
            "the ClickHouse sink group's heartbeat offset carries no time yet: run the ClickHouse sink once (knowton sink run --store clickhouse --once)"
        )
        return 2
    scratch = f"knowton-bench-{uuid.uuid4().hex[:8]}"
    legacy = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": scratch})
    legacy.commit(offsets=[TopicPartition(HEARTBEAT.topic, 0, committed.offset)], asynchronous=False)
    legacy.close()

    pairs = {
        "connector_health_sensor": (connect_tick, lambda: client.connectors_with_status()),
        "replication_lag_sensor": (lag_tick, lag_raw),
        "applied heartbeat": (
            lambda: applied_heartbeat(settings.kafka_bootstrap, sink_group("clickhouse")),
            lambda: applied_heartbeat(settings.kafka_bootstrap, group_id=scratch),
        ),
    }
    print(f"{args.ticks} of each, alternating; reproduce with:")
    print(f'  eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/health_ticks.py --ticks {args.ticks}')
    print("(applied heartbeat: 'tick' is the stored time, 'raw' the fetch of the record)")
    header = ("what", "tick median", "raw median", "ratio", "tick mean", "raw mean", "ratio")
    print(f"{header[0]:<24}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, (tick, raw) in pairs.items():
        tick(), raw()  # warm up: connections, imports
        ticks, raws = [], []
        for _ in range(args.ticks):
            ticks.append(timed(tick))
            raws.append(timed(raw))
        # Kafka round trips here are bimodal (about 2 ms or 55 ms; a fetch about 55 ms or 1 s): the mean
        # shows what the median can hide.
        t_med, r_med = median_ms(ticks), median_ms(raws)
        t_mean, r_mean = statistics.mean(ticks) * 1000, statistics.mean(raws) * 1000
        figures = (t_med, r_med, t_med / r_med, t_mean, r_mean, t_mean / r_mean)
        print(f"{name:<24}" + "".join(f"{f:>12.2f}" if k in (2, 5) else f"{f:>12.1f}" for k, f in enumerate(figures)))
    conn.close()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})  # kept alive until it answers
    for future in admin.delete_consumer_groups([scratch], request_timeout=10).values():
        future.result(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
