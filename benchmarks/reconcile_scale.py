"""Reconciliation at scale, against the floor measured in the same run: PostgreSQL's checksum scan alone.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/reconcile_scale.py --rows 1000000 [--es]
    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/reconcile_scale.py --rows 10000000

Needs the stack up (`knowton stack up`). It generates a table of --rows rows in PostgreSQL (schema
`bench`) and the identical mirror in ClickHouse (database `knowton_bench`), both from the same formulas
inside each store, and with --es the matching search index `bench-events` written through the pipeline's
own writer. Nothing of the pipeline's own data is touched. It reports, medians of --repeat runs:

  floor        the PostgreSQL checksum scan alone (count and sum of row hashes over the whole table);
  no drift     a full reconciliation (per-day checksums in both stores at once, nothing differs): its ratio
               to the floor;
  100 drifted  100 scattered rows edited in the target: time to the exact, confirmed key list (the re-check
               confirms at a known position: the target's sink has applied past an anchor taken after the
               comparison; --fixed-wait re-checks after a fixed --settle wait instead, --settle 0 not at all),
               and the rows that travelled to Python (against 100 x the bisection threshold);
  incremental  the rows changed in the last hour (1,000 here) of the whole table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import Column, SyncedTable
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.reconcile.applied import position_watch
from knowton_pipeline.lib.reconcile.bisect import Segment
from knowton_pipeline.lib.reconcile.engine import ReconcileOptions, Reconciler, ReconcileResult
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import WriteItem, target_store
from knowton_pipeline.lib.stores import elasticsearch as es_store
from knowton_pipeline.lib.stores import postgres as pg_store
from knowton_pipeline.lib.stores.clickhouse import ClickHouseSide
from knowton_pipeline.lib.stores.elasticsearch import (
    DocumentStreamSide,
    ElasticsearchWriter,
    StoredHashSide,
    es_segment_query,
    es_source_fields,
    stream_documents,
)
from knowton_pipeline.lib.stores.postgres import PostgresSide
from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcSink, SinkTurns
from knowton_pipeline.lib.sync.source import stream_rows

DATABASE = "knowton_bench"
INDEX = "bench-events"
TABLE = SyncedTable(
    name="events",
    schema="bench",
    key=("id",),
    columns=(
        Column("id", "bigint"),
        Column("account", "text"),
        Column("amount", "numeric", scale=2),
        Column("status", "text"),
        Column("createdAt", "timestamptz"),
        Column("updatedAt", "timestamptz"),
    ),
    clickhouse_table="events",
    elasticsearch_index=INDEX,
    description="generated benchmark table",
)
TWO_YEARS = 63_072_000

PG_DDL = """
CREATE SCHEMA IF NOT EXISTS bench;
DROP TABLE IF EXISTS bench.events;
CREATE UNLOGGED TABLE bench.events (
    id bigint PRIMARY KEY, account text NOT NULL, amount numeric(12, 2) NOT NULL, status text NOT NULL,
    "createdAt" timestamptz NOT NULL, "updatedAt" timestamptz NOT NULL);
"""
PG_FILL = f"""
INSERT INTO bench.events
SELECT i, 'acct-' || (i %% 50000), ((i * 7919) %% 100000) / 100.0, (ARRAY['pending','completed','failed'])[i %% 3 + 1],
       timestamptz '2025-01-01 00:00:00+00' + (i %% {TWO_YEARS}) * interval '1 second',
       timestamptz '2025-01-01 00:00:00+00' + (i %% {TWO_YEARS}) * interval '1 second'
         + ((i * 37) %% 1000000) * interval '1 microsecond'
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i
"""
CH_DDL = [
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"DROP TABLE IF EXISTS {DATABASE}.events",
    f"""CREATE TABLE {DATABASE}.events (id Int64, account String, amount Decimal(12, 2), status LowCardinality(String),
        created_at DateTime64(6, 'UTC'), updated_at DateTime64(6, 'UTC'), version UInt64, is_deleted UInt8)
        ENGINE = ReplacingMergeTree(version, is_deleted) ORDER BY id""",
]
CH_FILL = f"""
INSERT INTO {DATABASE}.events
SELECT i, concat('acct-', toString(i % 50000)),
       toDecimal64(concat(toString(intDiv((i * 7919) % 100000, 100)), '.', leftPad(toString((i * 7919) % 100), 2, '0')), 2),
       ['pending', 'completed', 'failed'][i % 3 + 1],
       toDateTime64('2025-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(i % {TWO_YEARS}),
       toDateTime64('2025-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(i % {TWO_YEARS})
         + toIntervalMicrosecond((i * 37) % 1000000),
       1, 0
FROM (SELECT toInt64(number) + {{lo:Int64}} AS i FROM numbers({{n:UInt64}}))
"""
ES_MAPPING = {
    "dynamic": "strict",
    "properties": {
        "id": {"type": "long"},
        "account": {"type": "keyword"},
        "amount": {"type": "keyword"},
        "status": {"type": "keyword"},
        "created_at": {"type": "date"},
        "updated_at": {"type": "date"},
        "pg_lsn": {"type": "long"},
        "is_deleted": {"type": "boolean"},
        "indexed_at": {"type": "date"},
        es_store.ES_HASH_FIELD: {"type": "keyword"},
        **{p: {"type": "integer"} for p in es_store.ES_HASH_PARTS},
    },
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def generate(conn: psycopg.Connection, ch: Any, rows: int) -> None:
    conn.execute(PG_DDL)
    step = 1_000_000
    for lo in range(1, rows + 1, step):
        hi = min(rows, lo + step - 1)
        conn.execute(PG_FILL, {"lo": lo, "hi": hi})
        print(f"  postgres: {hi:,} rows", flush=True)
    conn.execute('CREATE INDEX ON bench.events ("updatedAt")')
    conn.execute("VACUUM ANALYZE bench.events")
    for stmt in CH_DDL:
        ch.command(stmt)
    for lo in range(1, rows + 1, step):
        ch.command(CH_FILL, parameters={"lo": lo, "n": min(step, rows - lo + 1)})
    ch.command(f"OPTIMIZE TABLE {DATABASE}.events FINAL")
    print(f"  clickhouse: {rows:,} rows", flush=True)


def index_documents(conn: psycopg.Connection, es: Elasticsearch) -> None:
    if es.indices.exists(index=INDEX):
        es.indices.delete(index=INDEX)
    es.indices.create(
        index=INDEX,
        settings={"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "-1"},
        mappings=ES_MAPPING,
    )
    writer = ElasticsearchWriter(es)
    done = 0
    with conn.transaction():
        for chunk in stream_rows(conn, TABLE, psycopg.sql.SQL("true"), (), chunk=5000):
            writer.write([WriteItem(TABLE, row, 1, False) for row in chunk])
            done += len(chunk)
            if done % 200_000 == 0:
                print(f"  elasticsearch: {done:,} documents", flush=True)
    es.indices.put_settings(index=INDEX, settings={"refresh_interval": "1s"})
    es.indices.refresh(index=INDEX)
    es.indices.forcemerge(index=INDEX, max_num_segments=1)


def raw_read(es: Elasticsearch, parts: int) -> int:
    """The floor of the full search check: every live document's fields read, in `parts` slices of one point in
    time on as many threads, and nothing else done with them."""
    query, fields = es_segment_query(TABLE), es_source_fields(TABLE)

    def read(i: int) -> int:
        return sum(1 for _ in stream_documents(es, INDEX, "id", query, fields, part=(i, parts)))

    with ThreadPoolExecutor(parts) as pool:
        return sum(pool.map(read, range(parts)))


def search_floor(es: Elasticsearch, repeat: int) -> tuple[float, str]:
    """The fastest raw read of the documents: one stream, or sliced on 2 or 4 threads (median of `repeat` each)."""
    best: tuple[float, str] | None = None
    for parts in (1, 2, 4):
        t = statistics.median(timed(lambda p=parts: raw_read(es, p))[0] for _ in range(repeat))
        print(f"  raw read of the index, {parts} slice(s): median {t:.2f} s", flush=True)
        if best is None or t < best[0]:
            best = (t, f"{parts} slice(s)")
    assert best is not None
    return best


def reconciler(
    conn: psycopg.Connection, target: Any, name: str, confirm: Confirm | None = None, **options: Any
) -> Reconciler:
    """Without `confirm`, the first pass is the result (settle_seconds 0)."""
    opts = ReconcileOptions(**{"settle_seconds": 0, **options, **(confirm.options if confirm else {})})
    store = target_store(name)
    return Reconciler(
        TABLE,
        store,
        PostgresSide(conn, TABLE, shape=store.shape),
        target,
        opts,
        on_progress=confirm.progress if confirm else None,
        watch=confirm.watch(conn, name) if confirm else None,
        make_visible=lambda: store.make_visible(confirm.clients[name], TABLE) if confirm else None,
    )  # type: ignore[arg-type]


class Confirm:
    """How the drifted runs confirm their differences: at a known position (the default), after a fixed wait, or
    not at all (settle 0). While it waits, the ClickHouse sink takes its turns here: this process holds the engine."""

    def __init__(self, settings: Settings, ch: Any, es: Elasticsearch, *, settle: float, fixed_wait: bool):
        self.settings, self.clients, self.fixed_wait = settings, {"clickhouse": ch, "elasticsearch": es}, fixed_wait
        self.options = {"settle_seconds": settle}
        sink = CdcSink(
            ApplyConfig(bootstrap=settings.kafka_bootstrap, max_retry_seconds=10.0),
            store="clickhouse",
            client=ch,
            pg_conninfo=settings.pg_conninfo(),
        )
        self.turns = SinkTurns(sink, every=0.0)

    def progress(self, message: str) -> None:
        if message.startswith("waiting for"):  # only while the re-check waits for the target's position
            self.turns()

    def watch(self, conn: psycopg.Connection, name: str) -> Any:
        return None if self.fixed_wait else position_watch(conn, name, self.settings.kafka_bootstrap)


def _rewrite(conn: psycopg.Connection, es: Elasticsearch, keys: list[int], bump: bool) -> None:
    version = time.time_ns()  # each rewrite newer than the last, of this run or an earlier one (--reuse)
    with conn.transaction():
        rows = [r for chunk in stream_rows(conn, TABLE, psycopg.sql.SQL("t.id = ANY(%s)"), (keys,)) for r in chunk]
    if bump:
        rows = [{**r, "amount": r["amount"] + 1} for r in rows]
    ElasticsearchWriter(es).write([WriteItem(TABLE, r, version, False) for r in rows])
    es.indices.refresh(index=INDEX)


def drift(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, keys: list[int]) -> None:
    """Edit `amount` of `keys` in the target, behind the pipeline's back (in Elasticsearch: a bad write, which
    the stored hashes reflect, so both modes can see it)."""
    if es is None:
        ch.command(
            f"INSERT INTO {DATABASE}.events SELECT * REPLACE (amount + 1 AS amount, version + 1 AS version) "
            f"FROM {DATABASE}.events AS e FINAL WHERE e.id IN {{keys:Array(Int64)}}",
            parameters={"keys": keys},
        )
    else:
        _rewrite(conn, es, keys, True)


def undo(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, keys: list[int]) -> None:
    if es is None:
        ch.command(
            f"ALTER TABLE {DATABASE}.events DELETE WHERE id IN {{keys:Array(Int64)}} AND version > 1 "
            "SETTINGS mutations_sync = 1",
            parameters={"keys": keys},
        )
    else:
        _rewrite(conn, es, keys, False)


def touch_recent(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, n: int) -> None:
    """`n` rows changed in the last hour, in every store alike."""
    now = datetime.now(UTC).replace(microsecond=123456) - timedelta(minutes=10)
    keys = random.Random(7).sample(range(1, conn.execute("SELECT max(id) FROM bench.events").fetchone()[0]), n)  # type: ignore[index]
    conn.execute('UPDATE bench.events SET "updatedAt" = %s WHERE id = ANY(%s)', (now, keys))
    ch.command(
        f"INSERT INTO {DATABASE}.events SELECT * REPLACE ({{ts:DateTime64(6, 'UTC')}} AS updated_at, version + 1 AS version) "
        f"FROM {DATABASE}.events AS e FINAL WHERE e.id IN {{keys:Array(Int64)}}",
        parameters={"ts": now.strftime("%Y-%m-%d %H:%M:%S.%f"), "keys": keys},
    )
    if es is not None:
        _rewrite(conn, es, keys, False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--es", action="store_true", help="also the Elasticsearch target (1M documents is plenty)")
    p.add_argument("--reuse", action="store_true", help="keep the generated data of a previous run")
    p.add_argument("--threshold", type=int, default=256)
    p.add_argument("--settle", type=float, default=5.0, help="the drifted runs' settle_seconds (0: no re-check)")
    p.add_argument("--fixed-wait", action="store_true", help="re-check after a fixed wait, not at a known position")
    args = p.parse_args()
    settings = Settings.from_env()
    ch = clickhouse.get_client(settings.clickhouse_dsn)
    es = Elasticsearch(settings.es_url, request_timeout=300)
    confirm = Confirm(settings, ch, es, settle=args.settle, fixed_wait=args.fixed_wait)
    confirm.turns()  # the ClickHouse sink catches up first, untimed
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        if not args.reuse:
            print(f"generating {args.rows:,} rows ...", flush=True)
            t, _ = timed(lambda: generate(conn, ch, args.rows))
            print(f"  generated in {t:.1f} s")
            if args.es:
                t, _ = timed(lambda: index_documents(conn, es))
                print(f"  indexed in {t:.1f} s")
        rows = conn.execute("SELECT count(*) FROM bench.events").fetchone()[0]  # type: ignore[index]
        floor = [timed(lambda: pg_store.segment_checksum(conn, TABLE))[0] for _ in range(args.repeat)]
        f = statistics.median(floor)
        print(f"\n{rows:,} rows; floor (PostgreSQL checksum scan alone): median {f:.2f} s ({rows / f:,.0f} rows/s)")
        targets: list[tuple[str, Callable[[], Any], Elasticsearch | None, dict[str, Any]]] = [
            ("clickhouse", lambda: ClickHouseSide(ch, TABLE, database=DATABASE), None, {})
        ]
        if args.es:
            targets.append(("elasticsearch", lambda: StoredHashSide(es, TABLE, index=INDEX), es, {}))
            targets.append(
                (
                    "elasticsearch",
                    lambda: DocumentStreamSide(es, TABLE, index=INDEX),
                    es,
                    {"mode": "full"},
                )
            )
        if args.es:
            es_floor, es_floor_how = search_floor(es, args.repeat)
            print(f"floor of the full search check (reading every document raw): {es_floor:.2f} s ({es_floor_how})")
        print(
            "| target | mode | no drift median s | ratio to floor | target scan alone s | "
            "100 drifted: s to keys | confirmed by | keys found | rows to Python |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, side, drift_es, extra in targets:
            clean = [
                timed(lambda s=side, n=name, x=extra: reconciler(conn, s(), n, **x).run()) for _ in range(args.repeat)
            ]
            assert all(r.clean for _, r in clean), "generated stores should match"
            t_clean = statistics.median(t for t, _ in clean)
            # The target's own share, alone: on a small machine both stores share the same cores.
            t_target = statistics.median(timed(lambda s=side: s().checksum(Segment()))[0] for _ in range(args.repeat))
            keys = random.Random(1).sample(range(1, rows + 1), 100)
            drift(conn, ch, drift_es, keys)
            try:
                found: list[tuple[float, ReconcileResult]] = [
                    timed(
                        lambda s=side, n=name, x=extra: reconciler(
                            conn, s(), n, confirm, threshold=args.threshold, **x
                        ).run()
                    )
                    for _ in range(args.repeat)
                ]
            finally:
                undo(conn, ch, drift_es, keys)
            t_found = statistics.median(t for t, _ in found)
            result = found[-1][1]
            exact = sorted(result.differences.different) == sorted(keys)
            print(
                f"| {name} | {result.mode} | {t_clean:.2f} | {t_clean / f:.2f} | {t_target:.2f} | {t_found:.2f} | "
                f"{result.confirmed_by} | {len(result.differences.different)} ({'exact' if exact else 'NOT exact'}) | "
                f"{result.stats.rows_compared:,} (100 x threshold = {100 * args.threshold:,}) |"
            )
            if extra.get("mode") == "full":
                print(
                    f"  full search check, Elasticsearch side alone: {t_target:.2f} s = {t_target / es_floor:.2f} x its "
                    f"floor ({es_floor:.2f} s, {es_floor_how}); the whole check {t_clean / es_floor:.2f} x"
                )
        touch_recent(conn, ch, es if args.es else None, 1000)
        inc = [
            timed(
                lambda: reconciler(
                    conn, ClickHouseSide(ch, TABLE, database=DATABASE), "clickhouse", mode="incremental"
                ).run()
            )
            for _ in range(args.repeat)
        ]
        t_inc = statistics.median(t for t, _ in inc)
        r = inc[-1][1]
        print(
            f"\nincremental (clickhouse, last hour): median {t_inc:.2f} s for {r.source_rows:,} changed rows of {rows:,}; "
            f"clean={r.clean}"
        )
    es.close()


if __name__ == "__main__":
    main()
