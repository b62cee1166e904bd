"""Backfill throughput against the raw store writes of the same rows, measured in the same run.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/backfill_throughput.py [--repeat 3]

Needs the stack up (`knowton stack up`) and demo data in PostgreSQL (`knowton seed`). Writes go to
throwaway targets (ClickHouse database `knowton_bench_backfill`, Elasticsearch indices `knowton-*-bench`),
never to the pipeline's own. For each table and store it times:
  backfill  read from PostgreSQL in a consistent snapshot, transform, write (what a backfill run does);
  raw       the store operation alone on the already-finished rows: one ClickHouse `insert`, or
            `helpers.bulk` of the finished documents with the same versioning and chunk size.
The figure is the ratio of the medians, backfill rows/s over raw rows/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
from elasticsearch import Elasticsearch, helpers

from knowton_pipeline.catalog import TABLES, SyncedTable
from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter, ensure_stored_hash
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.backfill import backfill_range
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import split_enrichment, stream_rows
from knowton_pipeline.lib.transform import clickhouse_columns, document_id, to_clickhouse_row, to_es_document

BENCH_DB = "knowton_bench_backfill"
CHUNK = 5000
ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1))


def finished_rows(conn: psycopg.Connection, t: SyncedTable, enriched: bool) -> tuple[int, list[tuple[dict, dict]]]:
    from psycopg import sql

    with consistent_snapshot(conn) as lsn:
        stream = stream_rows(conn, t, sql.SQL("true"), (), chunk=CHUNK, enriched=enriched)
        rows = [r for chunk in stream for r in chunk]
    return lsn, [split_enrichment(t, r) for r in rows]


def bench_clickhouse(conn: psycopg.Connection, ch, t: SyncedTable, repeat: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    lsn, rows = finished_rows(conn, t, enriched=False)
    finished = [to_clickhouse_row(t, row, version=lsn, deleted=False) for row, _ in rows]
    backfill, raw = [], []
    for _ in range(repeat):
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.{t.clickhouse_table}")
        t0 = time.perf_counter()
        stats = backfill_range(conn, t, *ALL_TIME, ClickHouseWriter(ch, database=BENCH_DB), chunk=CHUNK)
        backfill.append(stats.rows / (time.perf_counter() - t0))
        ch.command(f"TRUNCATE TABLE {BENCH_DB}.{t.clickhouse_table}")
        t0 = time.perf_counter()
        ch.insert(f"{BENCH_DB}.{t.clickhouse_table}", finished, column_names=clickhouse_columns(t))
        raw.append(len(finished) / (time.perf_counter() - t0))
    return {"rows": len(finished), "backfill": statistics.median(backfill), "raw": statistics.median(raw)}


def bench_elasticsearch(conn: psycopg.Connection, es: Elasticsearch, t: SyncedTable, repeat: int) -> dict[str, float]:
    assert t.elasticsearch_index
    index = f"{t.elasticsearch_index}-bench"
    lsn, rows = finished_rows(conn, t, enriched=True)
    now = datetime.now(UTC)
    actions = [
        {
            "_op_type": "index",
            "_index": index,
            "_id": document_id(t, [row[k] for k in t.key]),
            "version": lsn,
            "version_type": "external_gte",
            "_source": to_es_document(
                t, row, version=lsn, deleted=False, indexed_at=now, enrichment=enrichment or None
            ),
        }
        for row, enrichment in rows
    ]
    backfill, raw = [], []
    for _ in range(repeat):
        for label, run in (
            (
                "backfill",
                lambda: (
                    backfill_range(
                        conn,
                        t,
                        *ALL_TIME,
                        ElasticsearchWriter(es, index_names={t.elasticsearch_index: index}),
                        chunk=CHUNK,
                    ).rows
                ),
            ),
            ("raw", lambda: helpers.bulk(es, actions, chunk_size=CHUNK, max_retries=0)[0]),
        ):
            es.options(ignore_status=404).indices.delete(index=index)
            es.indices.create(index=index)
            t0 = time.perf_counter()
            n = run()
            rate = n / (time.perf_counter() - t0)
            (backfill if label == "backfill" else raw).append(rate)
    es.options(ignore_status=404).indices.delete(index=index)
    return {"rows": len(actions), "backfill": statistics.median(backfill), "raw": statistics.median(raw)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.from_env()
    ch = clickhouse.get_client(settings.clickhouse_dsn)
    clickhouse.run_script(ch, read_sql("clickhouse", "mirrors.sql").replace("knowton", BENCH_DB))
    for mirrored in TABLES:  # as `knowton schema apply` leaves the mirrors: each with its stored row hash
        ensure_stored_hash(ch, mirrored, BENCH_DB)
    es = Elasticsearch(settings.es_url, request_timeout=120)
    print(f"command: .venv/bin/python benchmarks/backfill_throughput.py --repeat {args.repeat}")
    print(f"{'table':<10} {'store':<14} {'rows':>8} {'backfill rows/s':>16} {'raw rows/s':>12} {'ratio':>7}")
    results = []
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        for t in TABLES:
            targets = [("clickhouse", lambda t=t: bench_clickhouse(conn, ch, t, args.repeat))]
            if t.elasticsearch_index:
                targets.append(("elasticsearch", lambda t=t: bench_elasticsearch(conn, es, t, args.repeat)))
            for store, run in targets:
                r = run()
                if not r["rows"]:
                    print(f"{t.name}: no rows; run `knowton seed` first", file=sys.stderr)
                    return 2
                ratio = r["backfill"] / r["raw"]
                results.append(ratio)
                print(
                    f"{t.name:<10} {store:<14} {r['rows']:>8.0f} {r['backfill']:>16,.0f} {r['raw']:>12,.0f} {ratio:>7.2f}"
                )
    ch.command(f"DROP DATABASE IF EXISTS {BENCH_DB}")
    print(
        f"medians of {args.repeat} runs each; ratio = backfill / raw (aim: >= 0.5 for ClickHouse, >= 0.9 for Elasticsearch)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
