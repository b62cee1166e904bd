"""The search sink as a service, on the real stack: started as a stack component it makes a committed row searchable
with no run and no apply call; SIGKILLed, its supervisor starts it again and nothing is lost; stopped, it ends
cleanly. It never opens ClickHouse. Two sink processes share the partitions through their consumer group, and when
one is killed mid-stream the other takes its partitions over with nothing lost and no stale write winning."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import CDC_TABLES, HEARTBEAT
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.service import SinkStatus, service_argv
from knowton_pipeline.stack.components import SearchSink
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import assert_reconciled, insert_user, wait_for


def searchable(es: Elasticsearch, address: str, reputation: int) -> bool:
    hits = es.search(index="knowton-users", query={"ids": {"values": [address]}})["hits"]["hits"]
    return bool(hits) and hits[0]["_source"]["reputation"] == reputation


def test_the_search_sink_service_applies_changes_as_they_come_and_outlives_a_kill(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    stack: Stack,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    sink = stack.components["sink-elasticsearch"]
    assert isinstance(sink, SearchSink)
    [status] = [s for s in stack.up([sink.name]) if s.name == sink.name]
    try:
        assert status.state == "running", status
        first = wait_for(
            lambda: (
                (s := SinkStatus.load(sink.status_path)) is not None and s.partitions and s.state == "running" and s
            ),
            timeout=60,
            what="the sink assigned its partitions",
        )
        address = insert_user(pg, reputation=3)
        wait_for(lambda: searchable(es, address, 3), timeout=30, what="the row searchable with no apply call")
        pg.execute('UPDATE "User" SET reputation = 4 WHERE address = %s', (address,))
        wait_for(lambda: searchable(es, address, 4), timeout=30, what="the update searchable")
        # The sink never opened the embedded ClickHouse engine: chDB is not even loaded in its process.
        assert "chdb" in Path(f"/proc/{os.getpid()}/maps").read_text(), "the probe sees chDB where it is loaded"
        assert "chdb" not in Path(f"/proc/{first.pid}/maps").read_text()

        os.kill(first.pid, signal.SIGKILL)  # the sink itself, not its supervisor
        second = insert_user(pg, reputation=5)  # written while no sink runs
        wait_for(
            lambda: (
                (s := SinkStatus.load(sink.status_path)) is not None and s.pid != first.pid and s.state == "running"
            ),
            timeout=90,
            what="the supervisor started the sink again",
        )
        wait_for(lambda: searchable(es, second, 5), timeout=60, what="the row written while the sink was dead")
        assert stack.status([sink.name])[0].state == "running"
    finally:
        stack.down([sink.name])
    stopped = SinkStatus.load(sink.status_path)
    assert stopped is not None and stopped.state == "stopped", "SIGTERM ends the sink cleanly"
    apply()  # ClickHouse's sink, which the service does not run
    assert_reconciled(settings, ch, es, "User", [address, second])


def start_sink(settings: Settings, status_path: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOWTON_")}
    env.update(settings.export_env(include_secrets=True))
    with open(log, "ab") as out:
        return subprocess.Popen(
            service_argv("elasticsearch", status_path, "--batch-size", "50"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_two_search_sinks_share_the_partitions_and_one_takes_over_when_the_other_is_killed(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    stack: Stack,
    stack_home: Path,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    folder = stack_home / "test-sinks"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"sink-{i}.json" for i in range(2)]
    for p in paths:
        p.unlink(missing_ok=True)
    layout = _cdc_partitions(settings)
    assert all(
        len(parts) == int(settings["KNOWTON_CDC_PARTITIONS"]) > 1 for t, parts in layout.items() if t != HEARTBEAT.topic
    )
    partitions = sum(len(parts) for parts in layout.values())
    procs = [start_sink(settings, p, folder / f"sink-{i}.log") for i, p in enumerate(paths)]
    try:

        def statuses() -> list[SinkStatus | None]:
            return [SinkStatus.load(p) for p in paths]

        wait_for(
            lambda: (
                all(s and s.state == "running" and s.partitions for s in statuses())
                and sum(len(s.partitions) for s in statuses() if s) == partitions
            ),
            timeout=90,
            what="both sinks running, the partitions split between them",
        )
        # Rows written and rewritten while one sink dies: each ends at its last value.
        addresses = [insert_user(pg, reputation=0) for _ in range(60)]

        def write() -> None:
            with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
                for round_ in range(1, 7):
                    for a in addresses:
                        conn.execute('UPDATE "User" SET reputation = %s WHERE address = %s', (round_, a))
                    time.sleep(0.5)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)
        procs[0].send_signal(signal.SIGKILL)  # mid-stream
        procs[0].wait(timeout=10)
        writer.join(timeout=120)
        final = dict(
            pg.execute('SELECT address, reputation FROM "User" WHERE address = ANY(%s)', (addresses,)).fetchall()
        )
        assert set(final.values()) == {6}
        wait_for(
            lambda: (s := SinkStatus.load(paths[1])) is not None and len(s.partitions) == partitions,
            timeout=60,
            what="the surviving sink holds every partition",
        )

        def all_current() -> bool:
            docs = es.search(index="knowton-users", query={"ids": {"values": addresses}}, size=len(addresses))
            got = {h["_id"]: h["_source"]["reputation"] for h in docs["hits"]["hits"]}
            return got == final

        wait_for(all_current, timeout=90, what="every row searchable at its last value")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
    assert procs[1].returncode == 0, "SIGTERM ends the sink cleanly"
    apply()
    assert_reconciled(settings, ch, es, "User", addresses)


def _cdc_partitions(settings: Settings) -> dict[str, list[int]]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "partitions-probe"})
    try:
        meta = consumer.list_topics(timeout=10).topics
        return {t.topic: list(meta[t.topic].partitions) for t in CDC_TABLES}
    finally:
        consumer.close()
