"""Drill: one transaction that changes many large rows, streamed by Debezium without stopping CDC.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/large_transaction.py [--rows 30] [--mb 20]

Needs the demo stack up with its data (`knowton stack up; knowton schema apply; knowton connectors deploy;
knowton seed --if-empty`). It sets the `bio` of `--rows` users to distinct values of `--mb` MB each in one UPDATE,
so that Connect and the broker carry that many large events (each holds its row twice, old and new) one after the
other, then waits until Debezium has confirmed the transaction's position to PostgreSQL and the events are in
`cdc-User`, or its task FAILED. It prints the task's state, the time the transaction took to stream, and the
largest event. Afterwards it sets those bios back to short text (one more, small, transaction).

On the stack as shipped before its limits were set for it, 30 rows of 20 MB failed the task: Connect ran out of
heap (768 MiB, with Debezium's queue bounded by count only) and the broker out of direct memory (a temporary
buffer as large as a record kept per thread).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import psycopg
from confluent_kafka import Consumer, TopicPartition

from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import Settings

CONNECTOR = "postgres-cdc-source-connector"
TOPIC = "cdc-User"


def topic_end(settings: Settings) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"drill-{uuid.uuid4().hex}"})
    try:
        parts = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in parts)
    finally:
        consumer.close()


def task_state(client: KafkaConnectClient) -> str:
    tasks = (client.status(CONNECTOR) or {}).get("tasks") or [{}]
    return str(tasks[0].get("state", "missing"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    client = KafkaConnectClient(settings.connect_url)
    print("reproduce with:\n  " + " ".join([".venv/bin/python", "benchmarks/large_transaction.py", *sys.argv[1:]]))
    if task_state(client) != "RUNNING":
        raise SystemExit(f"the Debezium task is {task_state(client)}, not RUNNING: start from a healthy stack")
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        users = [r[0] for r in conn.execute('SELECT address FROM "User" ORDER BY address LIMIT %s', (args.rows,))]
        before = topic_end(settings)
        repeats = args.mb * 1024 * 1024 // 32
        t0 = time.monotonic()
        conn.execute(
            'UPDATE "User" SET bio = repeat(md5(address || %s), %s) WHERE address = ANY(%s)',
            (uuid.uuid4().hex, repeats, users),
        )
        (position,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()  # type: ignore[misc]
        print(f"committed {len(users)} rows of {args.mb} MB in one transaction; waiting for Debezium ...", flush=True)
        outcome = "timed out"
        while time.monotonic() - t0 < args.timeout:
            (confirmed,) = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot'",
                (position,),
            ).fetchone()  # type: ignore[misc]
            if confirmed and topic_end(settings) - before >= len(users):
                outcome = "streamed"
                break
            if task_state(client) == "FAILED":
                outcome = "task FAILED"
                break
            time.sleep(2)
        seconds = time.monotonic() - t0
        state = task_state(client)
        conn.execute(
            "UPDATE \"User\" SET bio = 'large-transaction drill' WHERE address = ANY(%s)", (users,)
        )  # back to short text
    print(f"\noutcome: {outcome} after {seconds:.0f} s; task {state}; events of about {2 * args.mb} MB each")
    if outcome != "streamed":
        print("the transaction's events are still in the slot: fix the cause, then restart the task")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
