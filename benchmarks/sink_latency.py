"""Sink latency: from a commit in PostgreSQL to the row being searchable in Elasticsearch, and visible in ClickHouse.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/sink_latency.py [--rate 500] [--seconds 60]

Needs the stack up with its search sink (`knowton stack up`, which starts `sink-elasticsearch`), the schema and
the connector (`knowton schema apply`, `knowton connectors deploy`), demo data to backfill (`knowton seed`), and
no Dagster running: this process opens the embedded ClickHouse engine and plays the ClickHouse sink the way
`cdc_lag_sensor` runs it (a caught-up `apply_cdc` every 10 s, queued behind a backfill, which gives it a turn
every 30 s). Its ClickHouse figures leave out what Dagster adds to each run (launching the run's process); the
search figures are the real service.

Three phases, each writing new `User` rows and timing each one from its commit until a search finds it (polled
every 0.2 s, no refresh forced) and until ClickHouse returns it (checked right after each batch the sink writes):
  idle       one row every 3 s (`--idle` rows);
  sustained  `--rate` rows/s for `--seconds`;
  backfill   the same rate while the users mirror and index are backfilled in full, over and over.
Reported per phase and store: p50, p95 and max in seconds, and rows never seen (must be 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcSink, SinkTurns
from knowton_pipeline.lib.sync.backfill import backfill_range
from knowton_pipeline.stack.manager import Stack

USER = table("User")
SENSOR_SECONDS = 10.0  # cdc_lag_sensor's interval
GIVE_UP_SECONDS = 300.0


class Tracker:
    """Commit times of the rows written, and when each store first showed each of them."""

    def __init__(self) -> None:
        self.committed: dict[str, float] = {}
        self.seen: dict[str, dict[str, float]] = {"elasticsearch": {}, "clickhouse": {}}
        self.lock = threading.Lock()

    def pending(self, store: str) -> list[str]:
        with self.lock:
            return [a for a in self.committed if a not in self.seen[store]]

    def saw(self, store: str, addresses: list[str], at: float) -> None:
        with self.lock:
            for a in addresses:
                self.seen[store].setdefault(a, at)

    def latencies(self, store: str) -> list[float]:
        return [self.seen[store][a] - t for a, t in self.committed.items() if a in self.seen[store]]


def write_rows(settings: Settings, tracker: Tracker, prefix: str, rate: float, seconds: float, every: float) -> None:
    """`rate` rows per second for `seconds`, committed in small transactions every `every` seconds."""
    per_tick = max(1, round(rate * every))
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            addresses = [f"0x{prefix}{n + i:08d}".ljust(42, "0")[:42] for i in range(per_tick)]
            n += per_tick
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    'INSERT INTO "User" (address, username, reputation) VALUES (%s, %s, 1)',
                    [(a, f"lat-{a[2:]}") for a in addresses],
                )
            committed = time.time()
            with tracker.lock:
                tracker.committed.update(dict.fromkeys(addresses, committed))
            time.sleep(max(0.0, start + n / (per_tick / every) - time.monotonic()))


def poll_search(es: Elasticsearch, tracker: Tracker, stop: threading.Event) -> None:
    while not stop.is_set():
        pending = tracker.pending("elasticsearch")
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            hits = es.search(index="knowton-users", query={"ids": {"values": chunk}}, size=len(chunk), source=False)[
                "hits"
            ]["hits"]
            tracker.saw("elasticsearch", [h["_id"] for h in hits], time.time())
        stop.wait(0.2)


def check_clickhouse(ch, tracker: Tracker) -> None:  # type: ignore[no-untyped-def]
    pending = tracker.pending("clickhouse")
    for i in range(0, len(pending), 5000):
        chunk = pending[i : i + 5000]
        rows = ch.query("SELECT address FROM knowton.users WHERE address IN {a:Array(String)}", parameters={"a": chunk})
        tracker.saw("clickhouse", [r[0] for r in rows.result_rows], time.time())


class ClickHouseSink:
    """The ClickHouse sink as Dagster runs it with the embedded engine: one caught-up run per sensor tick, taking the
    engine (the `clickhouse` pool) in turn with a backfill."""

    def __init__(self, settings: Settings, ch, tracker: Tracker, engine: threading.Lock) -> None:  # type: ignore[no-untyped-def]
        self.ch, self.tracker, self.engine = ch, tracker, engine
        self.sink = CdcSink(
            ApplyConfig(bootstrap=settings.kafka_bootstrap),
            store="clickhouse",
            client=ch,
            pg_conninfo=settings.pg_conninfo(),
            # A row is visible once the batch that wrote it is inserted: checked after each batch, in this thread.
            on_progress=lambda _stats: check_clickhouse(ch, tracker),
        )

    def run_once(self) -> None:
        self.sink.run(until_caught_up=True, max_seconds=600)
        check_clickhouse(self.ch, self.tracker)

    def loop(self, stop: threading.Event) -> None:
        while not stop.wait(SENSOR_SECONDS):
            with self.engine:
                self.run_once()


def backfill_loop(
    settings: Settings, ch, es: Elasticsearch, turns: Callable[[], None], engine: threading.Lock, stop: threading.Event
) -> None:  # type: ignore[no-untyped-def]
    """Full backfills of the users mirror (holding the engine, giving the sink its turns) and index, until stopped."""

    def index() -> None:
        with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                backfill_range(conn, USER, None, None, ElasticsearchWriter(es))

    indexing = threading.Thread(target=index)
    indexing.start()
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        while not stop.is_set():
            with engine:
                backfill_range(conn, USER, None, None, ClickHouseWriter(ch), on_progress=lambda _s: turns())
            stop.wait(1.0)  # the pool's queue: a run waiting for the engine gets it before the next backfill
    indexing.join()


def phase(
    name: str, settings: Settings, ch, es: Elasticsearch, write: Callable[[Tracker, str], None], backfill: bool
) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    tracker = Tracker()
    engine = threading.Lock()
    stop = threading.Event()
    sink = ClickHouseSink(settings, ch, tracker, engine)
    with engine:
        sink.run_once()  # start caught up
    threads = [
        threading.Thread(target=poll_search, args=(es, tracker, stop)),
        threading.Thread(target=sink.loop, args=(stop,)),
    ]
    if backfill:
        turns = SinkTurns(sink.sink)

        def turn() -> None:
            before = turns.turns
            turns()
            if turns.turns > before:
                check_clickhouse(ch, tracker)

        threads.append(threading.Thread(target=backfill_loop, args=(settings, ch, es, turn, engine, stop)))
    for t in threads:
        t.start()
    write(tracker, uuid.uuid4().hex[:8])
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while time.monotonic() < deadline and (tracker.pending("elasticsearch") or tracker.pending("clickhouse")):
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    out = {}
    for store in ("elasticsearch", "clickhouse"):
        lat = sorted(tracker.latencies(store))
        out[store] = {
            "rows": len(tracker.committed),
            "p50": statistics.median(lat) if lat else float("nan"),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
            "max": lat[-1] if lat else float("nan"),
            "lost": len(tracker.committed) - len(lat),
        }
    print(f"  {name}: " + "; ".join(f"{s} p95 {r['p95']:.1f} s" for s, r in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="rows per second in the sustained phases")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the sustained phases")
    parser.add_argument("--idle", type=int, default=12, help="rows of the idle phase, one every 3 s")
    parser.add_argument("--skip-backfill", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    [search_sink] = Stack(settings, echo=lambda _m: None).status(["sink-elasticsearch"])
    if search_sink.state != "running":
        print(f"the search sink is {search_sink.state}: start it with `knowton stack up`", file=sys.stderr)
        return 2
    es = Elasticsearch(settings.es_url, request_timeout=120)
    ch = clickhouse.get_client(settings.clickhouse_dsn)

    def idle(tracker: Tracker, prefix: str) -> None:
        write_rows(settings, tracker, prefix, rate=1 / 3, seconds=3 * args.idle - 1, every=3.0)

    def sustained(tracker: Tracker, prefix: str) -> None:
        write_rows(settings, tracker, prefix, rate=args.rate, seconds=args.seconds, every=0.1)

    print("reproduce with:\n  " + " ".join([".venv/bin/python", "benchmarks/sink_latency.py", *(argv or sys.argv[1:])]))
    results = {"idle": phase("idle", settings, ch, es, idle, backfill=False)}
    results[f"{args.rate:g} rows/s"] = phase("sustained", settings, ch, es, sustained, backfill=False)
    if not args.skip_backfill:
        results[f"{args.rate:g} rows/s + backfill"] = phase("backfill", settings, ch, es, sustained, backfill=True)
    print(f"\n{'phase':<26} {'store':<14} {'rows':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'lost':>5}")
    for name, stores in results.items():
        for store, r in stores.items():
            print(
                f"{name:<26} {store:<14} {r['rows']:>6} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['max']:>7.2f} {r['lost']:>5}"
            )
    print(
        "ClickHouse: the sink as cdc_lag_sensor runs it (a caught-up run every 10 s, a turn every 30 s during a "
        "backfill), without Dagster's run launch."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
