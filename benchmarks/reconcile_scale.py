"""Reconciliation at scale, against the floor measured in the same run: PostgreSQL's checksum scan alone.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/reconcile_scale.py --rows 1000000 [--es]
    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/reconcile_scale.py --rows 10000000

Needs the stack up (`knowton stack up`). It generates two tables of --rows rows in PostgreSQL (schema `bench`):
`events` keyed by an integer and `accounts` keyed by text (addresses like User's), the identical mirrors in
ClickHouse (database `knowton_bench`), both from the same formulas inside each store, and with --es the search
index `bench-events` written through the pipeline's own writer. Nothing of the pipeline's own data is touched.
It reports, medians of --repeat runs, per table:

  floor        the PostgreSQL checksum scan alone (count and sum of row hashes over the whole table), with the
               parallel plan the reconciliation's grouped scan is given, measured in turns with the mirror's clean
               runs;
  no drift     a full reconciliation (both stores' checksums at once, PostgreSQL's summed by parts; nothing
               differs): its ratio to the floor;
  100 drifted  100 scattered rows edited in the target: time to the exact, confirmed key list (the re-check
               confirms at a known position: the target's sink has applied past an anchor taken after the
               comparison; --fixed-wait re-checks after a fixed --settle wait instead, --settle 0 not at all),
               and the rows that travelled to Python (against 100 x the bisection threshold);
  incremental  the rows changed in the last hour (1,000 here) of the whole table;
  reladiff     when it is installed (`pip install -e ".[bench]"`): reladiff's hashdiff of the PostgreSQL table
               against an identical copy in the same PostgreSQL, with no drift and with the same 100 rows edited
               in the copy, on 1 and 2 threads, in a process of its own;
  peak memory  the highest resident set of this process (and of reladiff's) so far, after each step.
Every timed check of the search index starts with the index's request cache empty, as on a live index (the sink's
refreshes empty it), so a repeat is not answered from the cache the run before it filled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from knowton_pipeline.lib.stores.clickhouse import ClickHouseSide, ensure_stored_hash
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
TWO_YEARS = 63_072_000


@dataclass(frozen=True)
class Bench:
    """A generated table: the same rows in PostgreSQL and ClickHouse, from the same formulas in each."""

    table: SyncedTable
    pg_ddl: str
    pg_fill: str  # parameters lo, hi
    ch_ddl: str
    ch_fill: str  # parameters lo, n
    ch_key: str  # the ClickHouse type of the key
    edited: str  # the column the drift edits (numeric in both stores)

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def key(self) -> str:
        return self.table.key[0]

    def key_of(self, i: int) -> Any:
        return i


class AccountsBench(Bench):
    def key_of(self, i: int) -> Any:
        return address(i)


def address(i: int) -> str:
    """Row i's key in `accounts`: 0x and 40 hex digits, as User's addresses (the SQL fills compute the same)."""
    return "0x" + hashlib.md5(str(i).encode()).hexdigest() + hashlib.md5(str(i * 7).encode()).hexdigest()[:8]


def _timestamps_pg(alias: str = "i") -> str:
    return (
        f"timestamptz '2025-01-01 00:00:00+00' + ({alias} %% {TWO_YEARS}) * interval '1 second', "
        f"timestamptz '2025-01-01 00:00:00+00' + ({alias} %% {TWO_YEARS}) * interval '1 second' "
        f"+ (({alias} * 37) %% 1000000) * interval '1 microsecond'"
    )


_TIMESTAMPS_CH = (
    f"toDateTime64('2025-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(i % {TWO_YEARS}), "
    f"toDateTime64('2025-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(i % {TWO_YEARS}) "
    "+ toIntervalMicrosecond((i * 37) % 1000000)"
)

EVENTS = Bench(
    table=SyncedTable(
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
        description="generated benchmark table, integer keys",
    ),
    pg_ddl="""CREATE UNLOGGED TABLE bench.events (
        id bigint PRIMARY KEY, account text NOT NULL, amount numeric(12, 2) NOT NULL, status text NOT NULL,
        "createdAt" timestamptz NOT NULL, "updatedAt" timestamptz NOT NULL)""",
    pg_fill=f"""INSERT INTO bench.events
        SELECT i, 'acct-' || (i %% 50000), ((i * 7919) %% 100000) / 100.0,
               (ARRAY['pending','completed','failed'])[i %% 3 + 1], {_timestamps_pg()}
        FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i""",
    ch_ddl=f"""CREATE TABLE {DATABASE}.events (id Int64, account String, amount Decimal(12, 2),
        status LowCardinality(String), created_at DateTime64(6, 'UTC'), updated_at DateTime64(6, 'UTC'),
        version UInt64, is_deleted UInt8) ENGINE = ReplacingMergeTree(version, is_deleted) ORDER BY id""",
    ch_fill=f"""INSERT INTO {DATABASE}.events
        SELECT i, concat('acct-', toString(i % 50000)),
               toDecimal64(concat(toString(intDiv((i * 7919) % 100000, 100)), '.',
                                  leftPad(toString((i * 7919) % 100), 2, '0')), 2),
               ['pending', 'completed', 'failed'][i % 3 + 1], {_TIMESTAMPS_CH}, 1, 0
        FROM (SELECT toInt64(number) + {{lo:Int64}} AS i FROM numbers({{n:UInt64}}))""",
    ch_key="Int64",
    edited="amount",
)

ACCOUNTS = AccountsBench(
    table=SyncedTable(
        name="accounts",
        schema="bench",
        key=("address",),
        columns=(
            Column("address", "text"),
            Column("username", "text"),
            Column("reputation", "int"),
            Column("bio", "text", nullable=True),
            Column("createdAt", "timestamptz"),
            Column("updatedAt", "timestamptz"),
        ),
        clickhouse_table="accounts",
        elasticsearch_index=None,
        description="generated benchmark table, text keys (addresses like User's)",
    ),
    pg_ddl="""CREATE UNLOGGED TABLE bench.accounts (
        address text COLLATE "C" PRIMARY KEY, username text NOT NULL, reputation integer NOT NULL, bio text,
        "createdAt" timestamptz NOT NULL, "updatedAt" timestamptz NOT NULL)""",
    pg_fill=f"""INSERT INTO bench.accounts
        SELECT '0x' || md5(i::text) || left(md5((i * 7)::text), 8), 'user-' || i, (i * 31) %% 1000,
               CASE WHEN i %% 4 = 0 THEN NULL ELSE 'bio of ' || i END, {_timestamps_pg()}
        FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i""",
    ch_ddl=f"""CREATE TABLE {DATABASE}.accounts (address String, username String, reputation Int32,
        bio Nullable(String), created_at DateTime64(6, 'UTC'), updated_at DateTime64(6, 'UTC'), version UInt64,
        is_deleted UInt8) ENGINE = ReplacingMergeTree(version, is_deleted) ORDER BY address""",
    ch_fill=f"""INSERT INTO {DATABASE}.accounts
        SELECT concat('0x', lower(hex(MD5(toString(i)))), left(lower(hex(MD5(toString(i * 7)))), 8)),
               concat('user-', toString(i)), toInt32((i * 31) % 1000),
               if(i % 4 = 0, NULL, concat('bio of ', toString(i))), {_TIMESTAMPS_CH}, 1, 0
        FROM (SELECT toInt64(number) + {{lo:Int64}} AS i FROM numbers({{n:UInt64}}))""",
    ch_key="String",
    edited="reputation",
)
BENCHES = {b.name: b for b in (EVENTS, ACCOUNTS)}
TABLE = EVENTS.table  # the table with a search index
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


def peak_mb() -> float:
    """This process's highest resident set so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(conn: psycopg.Connection, ch: Any, bench: Bench, rows: int) -> None:
    t = bench.table
    conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
    conn.execute(f"DROP TABLE IF EXISTS bench.{t.name}, bench.{t.name}_copy")
    conn.execute(bench.pg_ddl)
    step = 1_000_000
    for lo in range(1, rows + 1, step):
        hi = min(rows, lo + step - 1)
        conn.execute(bench.pg_fill, {"lo": lo, "hi": hi})
        print(f"  postgres {t.name}: {hi:,} rows", flush=True)
    conn.execute(f'CREATE INDEX ON bench.{t.name} ("updatedAt")')
    conn.execute(f"VACUUM ANALYZE bench.{t.name}")
    for stmt in (f"CREATE DATABASE IF NOT EXISTS {DATABASE}", f"DROP TABLE IF EXISTS {DATABASE}.{t.name}"):
        ch.command(stmt)
    ch.command(bench.ch_ddl)
    ensure_stored_hash(ch, t, DATABASE)  # as `knowton schema apply` gives every mirror
    for lo in range(1, rows + 1, step):
        ch.command(bench.ch_fill, parameters={"lo": lo, "n": min(step, rows - lo + 1)})
    ch.command(f"OPTIMIZE TABLE {DATABASE}.{t.name} FINAL")
    print(f"  clickhouse {t.name}: {rows:,} rows", flush=True)


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


def floor_scan(conn: psycopg.Connection, table: SyncedTable) -> Any:
    """PostgreSQL's plain checksum scan of the whole table, with the parallel plan the reconciliation's own grouped
    scan is given (`PostgresSide._grouped`), so that the two are measured alike."""
    with pg_store.parallel_aggregation(conn):
        return pg_store.segment_checksum(conn, table)


def uncached(side: Any) -> Any:
    """`side`, its index's request cache emptied: a live index, refreshed as the sink writes, would not answer a
    checksum from that cache, so no timed run may."""
    if isinstance(side, StoredHashSide | DocumentStreamSide):
        side.es.indices.clear_cache(index=side.index, request=True)
    return side


def reconciler(
    conn: psycopg.Connection,
    table: SyncedTable,
    target: Any,
    name: str,
    confirm: Confirm | None = None,
    **options: Any,
) -> Reconciler:
    """Without `confirm`, the first pass is the result (settle_seconds 0)."""
    uncached(target)
    opts = ReconcileOptions(**{"settle_seconds": 0, **options, **(confirm.options if confirm else {})})
    store = target_store(name)
    return Reconciler(
        table,
        store,
        PostgresSide(conn, table, shape=store.shape),
        target,
        opts,
        on_progress=confirm.progress if confirm else None,
        watch=confirm.watch(conn, name) if confirm else None,
        make_visible=lambda: store.make_visible(confirm.clients[name], table) if confirm else None,
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


def _rewrite(conn: psycopg.Connection, es: Elasticsearch, keys: list[Any], bump: bool) -> None:
    version = time.time_ns()  # each rewrite newer than the last, of this run or an earlier one (--reuse)
    with conn.transaction():
        rows = [r for chunk in stream_rows(conn, TABLE, psycopg.sql.SQL("t.id = ANY(%s)"), (keys,)) for r in chunk]
    if bump:
        rows = [{**r, "amount": r["amount"] + 1} for r in rows]
    ElasticsearchWriter(es).write([WriteItem(TABLE, r, version, False) for r in rows])
    es.indices.refresh(index=INDEX)


def drift(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, bench: Bench, keys: list[Any]) -> None:
    """Edit one column of `keys` in the target, behind the pipeline's back (in Elasticsearch: a bad write, which
    the stored hashes reflect, so both modes can see it)."""
    t, column = bench.table, bench.table.column(bench.edited).target_name
    key = t.column(bench.key).target_name
    if es is None:
        ch.command(
            f"INSERT INTO {DATABASE}.{t.clickhouse_table} SELECT * REPLACE ({column} + 1 AS {column}, "
            f"version + 1 AS version) FROM {DATABASE}.{t.clickhouse_table} AS e FINAL "
            f"WHERE e.{key} IN {{keys:Array({bench.ch_key})}}",
            parameters={"keys": keys},
        )
    else:
        _rewrite(conn, es, keys, True)


def undo(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, bench: Bench, keys: list[Any]) -> None:
    t = bench.table
    key = t.column(bench.key).target_name
    if es is None:
        ch.command(
            f"ALTER TABLE {DATABASE}.{t.clickhouse_table} DELETE WHERE {key} IN {{keys:Array({bench.ch_key})}} "
            "AND version > 1 SETTINGS mutations_sync = 1",
            parameters={"keys": keys},
        )
    else:
        _rewrite(conn, es, keys, False)


def touch_recent(conn: psycopg.Connection, ch: Any, es: Elasticsearch | None, bench: Bench, n: int) -> None:
    """`n` rows changed in the last hour, in every store alike."""
    now = datetime.now(UTC).replace(microsecond=123456) - timedelta(minutes=10)
    t = bench.table
    rows = conn.execute(f"SELECT count(*) FROM bench.{t.name}").fetchone()[0]  # type: ignore[index]
    keys = [bench.key_of(i) for i in random.Random(7).sample(range(1, rows + 1), n)]
    conn.execute(f'UPDATE bench.{t.name} SET "updatedAt" = %s WHERE "{bench.key}" = ANY(%s)', (now, keys))
    ch.command(
        f"INSERT INTO {DATABASE}.{t.clickhouse_table} SELECT * REPLACE ({{ts:DateTime64(6, 'UTC')}} AS updated_at, "
        f"version + 1 AS version) FROM {DATABASE}.{t.clickhouse_table} AS e FINAL "
        f"WHERE e.{t.column(bench.key).target_name} IN {{keys:Array({bench.ch_key})}}",
        parameters={"ts": now.strftime("%Y-%m-%d %H:%M:%S.%f"), "keys": keys},
    )
    if es is not None:
        _rewrite(conn, es, keys, False)


# reladiff runs in a process of its own, so its memory and threads are its own; the DSN (with the password)
# reaches it through the environment, never a command line.
RELADIFF = """
import json, os, sys, time
import reladiff
table_a, table_b, key, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
columns = tuple(json.loads(sys.argv[5]))
t0 = time.perf_counter()
segments = [
    reladiff.connect_to_table(os.environ["BENCH_PG_DSN"], name, key, thread_count=threads, extra_columns=columns)
    for name in (table_a, table_b)
]
found = list(reladiff.diff_tables(*segments, algorithm=reladiff.Algorithm.HASHDIFF, max_threadpool_size=threads))
keys = {row[0] for _, row in found}
print(json.dumps({"seconds": time.perf_counter() - t0, "keys": len(keys)}))
"""


def reladiff_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import reladiff"], capture_output=True).returncode == 0


def run_reladiff(settings: Settings, bench: Bench, threads: int) -> tuple[float, int, float]:
    """(seconds, differing keys, peak MiB) of one reladiff hashdiff of the table against its copy."""
    info = settings.pg_conninfo()
    dsn = f"postgresql://{info['user']}:{info['password']}@{info['host']}:{info['port']}/{info['dbname']}"
    t = bench.table
    columns = [c.name for c in t.columns if c.name != bench.key]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RELADIFF,
            f"bench.{t.name}",
            f"bench.{t.name}_copy",
            bench.key,
            str(threads),
            *[json.dumps(columns)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BENCH_PG_DSN": dsn},
        text=True,
    )
    out, err = proc.communicate()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        raise RuntimeError(f"reladiff failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], result["keys"], peak


def bench_reladiff(conn: psycopg.Connection, settings: Settings, bench: Bench, keys: list[Any], repeat: int) -> None:
    t = bench.table
    conn.execute(f"DROP TABLE IF EXISTS bench.{t.name}_copy")
    conn.execute(f"CREATE UNLOGGED TABLE bench.{t.name}_copy (LIKE bench.{t.name} INCLUDING ALL)")
    conn.execute(f"INSERT INTO bench.{t.name}_copy SELECT * FROM bench.{t.name}")
    conn.execute(f"VACUUM ANALYZE bench.{t.name}_copy")
    try:
        for threads in (1, 2):
            clean = [run_reladiff(settings, bench, threads) for _ in range(repeat)]
            assert all(k == 0 for _, k, _ in clean), "an identical copy should not differ"
            conn.execute(
                f'UPDATE bench.{t.name}_copy SET "{bench.edited}" = "{bench.edited}" + 1 WHERE "{bench.key}" = ANY(%s)',
                (keys,),
            )
            drifted = [run_reladiff(settings, bench, threads) for _ in range(repeat)]
            conn.execute(
                f'UPDATE bench.{t.name}_copy SET "{bench.edited}" = "{bench.edited}" - 1 WHERE "{bench.key}" = ANY(%s)',
                (keys,),
            )
            found = drifted[-1][1]
            print(
                f"| reladiff {threads} thread(s) (PostgreSQL vs a copy) | hashdiff | "
                f"{statistics.median(s for s, _, _ in clean):.2f} | | | {statistics.median(s for s, _, _ in drifted):.2f} | "
                f"| {found} ({'exact' if found == len(keys) else 'NOT exact'}) | | "
                f"{max(m for _, _, m in clean + drifted):,.0f} (its process) |",
                flush=True,
            )
    finally:
        conn.execute(f"DROP TABLE IF EXISTS bench.{t.name}_copy")


def bench_table(
    conn: psycopg.Connection,
    settings: Settings,
    ch: Any,
    es: Elasticsearch,
    bench: Bench,
    args: argparse.Namespace,
    confirm: Confirm,
    with_reladiff: bool,
) -> None:
    t = bench.table
    rows = conn.execute(f"SELECT count(*) FROM bench.{t.name}").fetchone()[0]  # type: ignore[index]
    if rows < args.rows // 2:
        raise SystemExit(f"bench.{t.name} holds {rows:,} rows, not about {args.rows:,}: run without --reuse")
    # The floor and the mirror's clean runs take turns, so that both meet the machine in the same state.
    floor: list[float] = []
    clean_mirror: list[tuple[float, ReconcileResult]] = []
    for _ in range(args.repeat):
        floor.append(timed(lambda: floor_scan(conn, t))[0])
        mirror = ClickHouseSide(ch, t, database=DATABASE)
        clean_mirror.append(
            timed(lambda m=mirror: reconciler(conn, t, m, "clickhouse", threshold=args.threshold).run())
        )
    f = statistics.median(floor)
    print(
        f"\n## {t.name} ({t.description}): {rows:,} rows\n\nfloor (PostgreSQL checksum scan alone): median {f:.2f} s "
        f"({rows / f:,.0f} rows/s)\nthe mirror's checksums sum "
        + ("its stored row hash" if mirror.stored else "a row hash computed from its columns (stored hash not ready)")
    )
    es_here = args.es and t.elasticsearch_index is not None
    targets: list[tuple[str, Callable[[], Any], Elasticsearch | None, dict[str, Any]]] = [
        ("clickhouse", lambda: ClickHouseSide(ch, t, database=DATABASE), None, {})
    ]
    if es_here:
        es_floor, es_floor_how = search_floor(es, args.repeat)
        print(f"floor of the full search check (reading every document raw): {es_floor:.2f} s ({es_floor_how})")
        targets.append(("elasticsearch", lambda: StoredHashSide(es, t, index=INDEX), es, {}))
        targets.append(("elasticsearch", lambda: DocumentStreamSide(es, t, index=INDEX), es, {"mode": "full"}))
    print(
        "\n| target | mode | no drift median s | ratio to floor | target scan alone s | "
        "100 drifted: s to keys | confirmed by | keys found | rows to Python | peak MiB so far |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = [bench.key_of(i) for i in random.Random(1).sample(range(1, rows + 1), 100)]
    for name, side, drift_es, extra in targets:
        clean = (
            clean_mirror
            if name == "clickhouse"
            else [
                timed(lambda s=side, n=name, x=extra: reconciler(conn, t, s(), n, threshold=args.threshold, **x).run())
                for _ in range(args.repeat)
            ]
        )
        assert all(r.clean for _, r in clean), "generated stores should match"
        t_clean = statistics.median(sec for sec, _ in clean)
        # The target's own share, alone: on a small machine both stores share the same cores.
        t_target = statistics.median(
            timed(lambda s=side: uncached(s()).checksum(Segment()))[0] for _ in range(args.repeat)
        )
        drift(conn, ch, drift_es, bench, keys)
        try:
            found: list[tuple[float, ReconcileResult]] = [
                timed(
                    lambda s=side, n=name, x=extra: reconciler(
                        conn, t, s(), n, confirm, threshold=args.threshold, **x
                    ).run()
                )
                for _ in range(args.repeat)
            ]
        finally:
            undo(conn, ch, drift_es, bench, keys)
        t_found = statistics.median(sec for sec, _ in found)
        result = found[-1][1]
        exact = sorted(result.differences.different) == sorted(keys)
        print(
            f"| {name} | {result.mode} | {t_clean:.2f} | {t_clean / f:.2f} | {t_target:.2f} | {t_found:.2f} "
            f"({t_found / f:.1f} x floor) | {result.confirmed_by} | {len(result.differences.different)} "
            f"({'exact' if exact else 'NOT exact'}) | {result.stats.rows_compared:,} (100 x threshold = "
            f"{100 * args.threshold:,}) | {peak_mb():,.0f} |",
            flush=True,
        )
        if extra.get("mode") == "full":
            print(
                f"  full search check, Elasticsearch side alone: {t_target:.2f} s = {t_target / es_floor:.2f} x its "
                f"floor ({es_floor:.2f} s, {es_floor_how}); the whole check {t_clean / es_floor:.2f} x"
            )
    if with_reladiff:
        bench_reladiff(conn, settings, bench, keys, args.repeat)
    touch_recent(conn, ch, es if es_here else None, bench, 1000)
    inc = [
        timed(
            lambda: reconciler(
                conn, t, ClickHouseSide(ch, t, database=DATABASE), "clickhouse", mode="incremental"
            ).run()
        )
        for _ in range(args.repeat)
    ]
    t_inc = statistics.median(sec for sec, _ in inc)
    r = inc[-1][1]
    print(
        f"\nincremental (clickhouse, last hour): median {t_inc:.2f} s for {r.source_rows:,} changed rows of {rows:,}; "
        f"clean={r.clean}; peak {peak_mb():,.0f} MiB so far"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tables", default="events,accounts", help="which generated tables: events, accounts")
    p.add_argument("--es", action="store_true", help="also the Elasticsearch target of events (1M is plenty)")
    p.add_argument("--reuse", action="store_true", help="keep the generated data of a previous run")
    p.add_argument("--no-reladiff", action="store_true", help="skip reladiff even when it is installed")
    p.add_argument("--threshold", type=int, default=256)
    p.add_argument("--settle", type=float, default=5.0, help="the drifted runs' settle_seconds (0: no re-check)")
    p.add_argument("--fixed-wait", action="store_true", help="re-check after a fixed wait, not at a known position")
    args = p.parse_args()
    benches = [BENCHES[name.strip()] for name in args.tables.split(",")]
    settings = Settings.from_env()
    ch = clickhouse.get_client(settings.clickhouse_dsn)
    es = Elasticsearch(settings.es_url, request_timeout=300)
    confirm = Confirm(settings, ch, es, settle=args.settle, fixed_wait=args.fixed_wait)
    confirm.turns()  # the ClickHouse sink catches up first, untimed
    with_reladiff = not args.no_reladiff and reladiff_installed()
    if not with_reladiff:
        print("reladiff: not run" + ("" if args.no_reladiff else ' (not installed: pip install -e ".[bench]")'))
    print(f"command: {' '.join(['python', 'benchmarks/reconcile_scale.py', *sys.argv[1:]])}")
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        if not args.reuse:
            for bench in benches:
                print(f"generating {args.rows:,} rows of {bench.name} ...", flush=True)
                t, _ = timed(lambda b=bench: generate(conn, ch, b, args.rows))
                print(f"  generated in {t:.1f} s")
            if args.es and EVENTS in benches:
                t, _ = timed(lambda: index_documents(conn, es))
                print(f"  indexed in {t:.1f} s")
        for bench in benches:
            bench_table(conn, settings, ch, es, bench, args, confirm, with_reladiff)
    print(f"\npeak resident set of this process: {peak_mb():,.0f} MiB")
    es.close()


if __name__ == "__main__":
    main()
