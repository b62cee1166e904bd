"""Sink throughput: the events per second each store's sink applies from a backlog, against the raw store write of
the same rows, measured in the same run.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/sink_throughput.py [--events 200000] [--repeat 3]

Needs the stack up, the schema and the connector (`knowton schema apply`, `knowton connectors deploy`) and demo
users (`knowton seed`), with the search sink stopped (`knowton stack down sink-elasticsearch`) and no Dagster
running, so that nothing else consumes the backlog or uses the CPU while it is measured. It commits `--events` updates of existing users in PostgreSQL, which Debezium streams
into `cdc-User`: the backlog. Then, for each store and repeat:
  sink  a throwaway consumer group, placed at the backlog's start, runs the store's sink (`CdcSink`) until it is
        caught up: decode, transform, versioned writes in the store's own batches (ClickHouse 20,000 changes,
        Elasticsearch 2,000), commits. The ClickHouse sink runs twice: reading its batches with the compiled
        reading (`lib/_columns.c`), as it does, and with msgspec alone (the line "clickhouse, msgspec reading");
  raw   the store operation alone on the rows the events carry, already transformed: one ClickHouse `insert` of
        the rows, and (a second line) one `insert_arrow` of the same rows as an Arrow table, ClickHouse's fastest
        way in from Python; or `helpers.bulk` of the same documents (stored hash fields included) with the same
        versioning in chunks of 2,000.
  read  the backlog read from Kafka alone, in batches of 2,000 (`consume`, each record's value touched): no sink
        can apply events faster than it reads them, so read / raw bounds the ratio any sink here can reach.
Both write to throwaway targets (ClickHouse database `knowton_bench_sink`, index `knowton-users-bench`), never the
pipeline's own. The figure is the ratio of the medians, sink events/s over raw rows/s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition
from elasticsearch import Elasticsearch, helpers

from knowton_pipeline.catalog import TABLES as ALL_TABLES
from knowton_pipeline.catalog import table
from knowton_pipeline.lib import clickhouse, debezium
from knowton_pipeline.lib.debezium import ChangeEvent, decode_event
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter, ensure_stored_hash
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter, es_hash_fields
from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcSink
from knowton_pipeline.lib.transform import clickhouse_columns, document_id, to_clickhouse_row, to_es_document

USER = table("User")
BENCH_DB = "knowton_bench_sink"
BENCH_INDEX = "knowton-users-bench"
BATCH = 2000


def ends(settings: Settings) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    try:
        parts = consumer.list_topics(USER.topic, timeout=10).topics[USER.topic].partitions
        return [
            TopicPartition(USER.topic, p, consumer.get_watermark_offsets(TopicPartition(USER.topic, p), timeout=10)[1])
            for p in parts
        ]
    finally:
        consumer.close()


def make_backlog(settings: Settings, events: int) -> tuple[list[TopicPartition], list[TopicPartition]]:
    """Commit `events` updates of existing users; returns the topic's ends before and after they are streamed."""
    start = ends(settings)
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        users = [r[0] for r in conn.execute('SELECT address FROM "User" ORDER BY address LIMIT 20000')]
        if not users:
            raise SystemExit("no users: run `knowton seed` first")
        done = 0
        while done < events:
            n = min(5000, events - done, len(users))  # one statement updates a row once
            with conn.transaction():
                conn.execute(
                    'UPDATE "User" SET reputation = reputation + 1 WHERE address = ANY(%s)',
                    ([users[(done + i) % len(users)] for i in range(n)],),
                )
            done += n
    deadline = time.monotonic() + 600
    while True:
        end = ends(settings)
        streamed = sum(tp.offset for tp in end) - sum(tp.offset for tp in start)
        if streamed >= events:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"Debezium streamed {streamed} of {events} events in 10 minutes")
        time.sleep(1)
    return start, end


def read_backlog(settings: Settings, start: list[TopicPartition], end: list[TopicPartition]) -> list:  # type: ignore[type-arg]
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign(start)
    stop = {tp.partition: tp.offset for tp in end}
    want = sum(tp.offset for tp in end) - sum(tp.offset for tp in start)
    events = []
    try:
        while len(events) < want:
            for m in consumer.consume(5000, timeout=1):
                if not m.error() and m.offset() < stop[m.partition()]:
                    e = decode_event(m.topic(), m.key(), m.value())
                    if e is not None:
                        events.append(e)
    finally:
        consumer.close()
    return events


def read_only(settings: Settings, start: list[TopicPartition], end: list[TopicPartition]) -> tuple[int, float]:
    """The backlog consumed and nothing done with it: how fast a sink could go if applying cost nothing."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 100,
        }
    )
    want = sum(tp.offset for tp in end) - sum(tp.offset for tp in start)
    read = 0
    t0 = time.perf_counter()
    consumer.assign(start)
    try:
        while read < want:
            read += sum(1 for m in consumer.consume(BATCH, timeout=1) if not m.error() and m.value() is not None)
    finally:
        seconds = time.perf_counter() - t0
        consumer.close()
    return read, seconds


def finished_document(e: ChangeEvent, now: datetime) -> dict[str, Any]:
    """The document the sink writes for an event: its columns, and the stored hash fields of a live one."""
    doc = to_es_document(USER, e.row, version=e.version, deleted=e.is_delete, indexed_at=now)
    if not e.is_delete:
        doc.update(es_hash_fields(USER, doc))
    return doc


def place_group(settings: Settings, group: str, start: list[TopicPartition]) -> None:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=start, asynchronous=False)
    finally:
        consumer.close()


def run_sink(settings: Settings, store: str, client, writer, start: list[TopicPartition]) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    group = f"knowton-bench-{store}-{uuid.uuid4().hex[:8]}"
    place_group(settings, group, start)
    sink = CdcSink(
        ApplyConfig(bootstrap=settings.kafka_bootstrap, group_id=group, topics=(USER.topic,)),
        store=store,
        client=client,
        pg_conninfo=settings.pg_conninfo(),
        writer=writer,
    )
    t0 = time.perf_counter()
    stats = sink.run(until_caught_up=True, max_seconds=3600)
    return stats.events, time.perf_counter() - t0


@contextlib.contextmanager
def msgspec_reading() -> Iterator[None]:
    """The sink's batches read with msgspec alone, as without the compiled reading."""
    compiled = debezium._columns
    debezium._columns = None  # type: ignore[assignment]
    debezium._COMPILED.clear()
    try:
        yield
    finally:
        debezium._columns = compiled
        debezium._COMPILED.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    print(
        "reproduce with:\n  " + " ".join([".venv/bin/python", "benchmarks/sink_throughput.py", *(argv or sys.argv[1:])])
    )
    ch = clickhouse.get_client(settings.clickhouse_dsn)
    clickhouse.run_script(ch, read_sql("clickhouse", "mirrors.sql").replace("knowton", BENCH_DB))
    for mirrored in ALL_TABLES:  # as `knowton schema apply` leaves the mirrors: each with its stored row hash
        ensure_stored_hash(ch, mirrored, BENCH_DB)
    es = Elasticsearch(settings.es_url, request_timeout=120)
    print(f"committing {args.events:,} updates and waiting for Debezium to stream them ...", flush=True)
    start, end = make_backlog(settings, args.events)
    events = read_backlog(settings, start, end)
    rows = [to_clickhouse_row(USER, e.row, version=e.version, deleted=e.is_delete) for e in events]
    arrow_rows = pa.Table.from_arrays(
        [pa.array(list(column)) for column in zip(*rows, strict=True)], names=clickhouse_columns(USER)
    )
    now = datetime.now(UTC)
    actions = [
        {
            "_op_type": "index",
            "_index": BENCH_INDEX,
            "_id": document_id(USER, [e.row[k] for k in USER.key]),
            "version": e.version,
            "version_type": "external_gte",
            "_source": finished_document(e, now),
        }
        for e in events
    ]
    if debezium._columns is None:
        print("the compiled reading is not built (pip install -e .): both ClickHouse lines read with msgspec")
    stores = ("clickhouse", "clickhouse (Arrow)", "clickhouse, msgspec reading", "elasticsearch")
    figures: dict[str, dict[str, list[float]]] = {s: {"sink": [], "raw": []} for s in stores}
    reads: list[float] = []
    for _ in range(args.repeat):
        n, seconds = read_only(settings, start, end)
        reads.append(n / seconds)
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.users")
        n, seconds = run_sink(settings, "clickhouse", ch, ClickHouseWriter(ch, database=BENCH_DB), start)
        figures["clickhouse"]["sink"].append(n / seconds)
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.users")
        t0 = time.perf_counter()
        ch.insert(f"{BENCH_DB}.users", rows, column_names=clickhouse_columns(USER))
        figures["clickhouse"]["raw"].append(len(rows) / (time.perf_counter() - t0))
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.users")
        t0 = time.perf_counter()
        ch.insert_arrow(f"{BENCH_DB}.users", arrow_rows)
        figures["clickhouse (Arrow)"]["raw"].append(len(rows) / (time.perf_counter() - t0))
        figures["clickhouse (Arrow)"]["sink"] = figures["clickhouse"]["sink"]
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.users")
        with msgspec_reading():
            n, seconds = run_sink(settings, "clickhouse", ch, ClickHouseWriter(ch, database=BENCH_DB), start)
        figures["clickhouse, msgspec reading"]["sink"].append(n / seconds)
        figures["clickhouse, msgspec reading"]["raw"] = figures["clickhouse"]["raw"]

        es.options(ignore_status=404).indices.delete(index=BENCH_INDEX)
        es.indices.create(index=BENCH_INDEX)
        writer = ElasticsearchWriter(es, index_names={"knowton-users": BENCH_INDEX})
        n, seconds = run_sink(settings, "elasticsearch", es, writer, start)
        figures["elasticsearch"]["sink"].append(n / seconds)
        es.options(ignore_status=404).indices.delete(index=BENCH_INDEX)
        es.indices.create(index=BENCH_INDEX)
        t0 = time.perf_counter()
        written, _ = helpers.bulk(es, actions, chunk_size=BATCH, max_retries=0, raise_on_error=False)
        figures["elasticsearch"]["raw"].append(written / (time.perf_counter() - t0))
    es.options(ignore_status=404).indices.delete(index=BENCH_INDEX)
    ch.command(f"DROP DATABASE IF EXISTS {BENCH_DB}")
    read = statistics.median(reads)
    print(
        f"\n{'store':<28} {'events':>8} {'sink events/s':>14} {'raw rows/s':>11} {'ratio':>6} "
        f"{'read events/s':>14} {'read / raw':>10}"
    )
    for store, f in figures.items():
        sink, raw = statistics.median(f["sink"]), statistics.median(f["raw"])
        print(
            f"{store:<28} {len(events):>8,} {sink:>14,.0f} {raw:>11,.0f} {sink / raw:>6.2f} {read:>14,.0f} {read / raw:>10.2f}"
        )
    print(
        f"medians of {args.repeat} runs each; ratio = sink / raw (aim: >= 0.7); read = the backlog consumed from Kafka "
        "with nothing applied, the bound of any sink's ratio"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
