"""The `knowton` command: run the local stack, apply schemas, deploy connectors, seed demo data."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from knowton_pipeline.lib.settings import Settings, SettingsError

EXIT_ERROR = 2


def _stack_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from knowton_pipeline.stack.manager import Stack, status_dicts, tail

    stack = Stack(settings, echo=lambda m: print(m, flush=True))
    if args.action == "up":
        statuses = stack.up(args.components or None)
        _print_status(statuses)
        return 0
    if args.action == "down":
        stack.down(args.components or None)
        return 0
    if args.action == "status":
        statuses = stack.status(args.components or None)
        if args.json:
            print(json.dumps(status_dicts(statuses), indent=2))
        else:
            _print_status(statuses)
        return 0 if all(s.state in ("running", "embedded", "remote", "in-use") for s in statuses) else 1
    if args.action == "logs":
        names = args.components or [c for c in stack.components]
        for name in names:
            comp = stack.select([name])[-1] if name in stack.components else None
            if comp is None:
                print(f"error: unknown component {name!r}", file=sys.stderr)
                return EXIT_ERROR
            print(f"==> {comp.log} <==")
            print(tail(comp.log, args.lines))
        return 0
    raise AssertionError(args.action)


def _print_status(statuses: Sequence[object]) -> None:
    for s in statuses:
        pid = f"pid {s.pid}" if s.pid else ""  # type: ignore[attr-defined]
        print(f"{s.name:<14} {s.state:<10} {s.address:<52} {pid:<11} {s.detail}")  # type: ignore[attr-defined]


def _schema_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from knowton_pipeline.lib import schema

    for line in schema.apply_all(settings, stores=args.stores or None):
        print(line, flush=True)
    return 0


def _connectors_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from knowton_pipeline.lib.connectors import deploy_connectors, load_connector_configs
    from knowton_pipeline.lib.kafka_connect import KafkaConnectClient

    client = KafkaConnectClient(settings.connect_url)
    if args.action == "deploy":
        results = deploy_connectors(client, load_connector_configs(), dry_run=args.dry_run)
        for r in results:
            print(r.describe())
        if args.json:
            print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    if args.action == "status":
        print(json.dumps(client.connectors_with_status(), indent=2))
        return 0
    raise AssertionError(args.action)


def _seed_cmd(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from knowton_pipeline.lib.seed import SeedError, SeedSize, seed_demo_data

    size = SeedSize(users=args.users, contents=args.contents, purchases=args.purchases)
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        try:
            report = seed_demo_data(conn, size, seed=args.seed, replace=args.replace, progress=not args.quiet)
        except SeedError as exc:
            if not args.if_empty:
                raise
            print(f"kept the existing data ({exc})")
            return 0
    total = report.users + report.contents + report.purchases
    print(
        f"seeded {report.users} users, {report.contents} contents, {report.purchases} purchases "
        f"in {report.seconds:.1f} s ({total / max(report.seconds, 1e-9):,.0f} rows/s)"
    )
    return 0


def _sync_cmd(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from elasticsearch import Elasticsearch

    from knowton_pipeline.lib import clickhouse
    from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcApplier

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if settings.clickhouse_dsn.startswith("chdb://") and not args.once:
        print(
            "note: the embedded ClickHouse stays open in this worker while it runs, so Dagster runs that "
            "use ClickHouse wait for it to stop; with a ClickHouse server (http://...) they do not.",
            file=sys.stderr,
        )
    es = Elasticsearch(settings.es_url, request_timeout=60)
    try:
        applier = CdcApplier(
            ApplyConfig(bootstrap=settings.kafka_bootstrap, batch_size=args.batch_size),
            clickhouse=clickhouse.get_client(settings.clickhouse_dsn),
            es=es,
            pg_conninfo=settings.pg_conninfo(),
            on_progress=lambda stats: print(stats.summary(), flush=True),
        )
        stats = applier.run(until_caught_up=args.once, stop=stop)
    finally:
        es.close()
    print(f"stopped: {stats.summary()}")
    return 0


def _print_result(r: Any) -> None:
    d = r.differences
    verdict = "clean" if r.clean else f"DRIFT: {d.total} key(s)"
    print(
        f"{r.table} -> {r.target} ({r.mode}): {verdict}  ({r.source_rows} rows in PostgreSQL, {r.target_rows} in "
        f"{r.target}; {r.stats.segments_checked} segments, {r.stats.rows_compared} rows compared, {r.seconds:.2f} s)"
    )
    for label, keys in (("missing in target", d.missing_in_target), ("extra in target", d.extra_in_target)):
        if keys:
            print(f"  {label}: {len(keys)}: {', '.join(map(str, keys[:10]))}{' ...' if len(keys) > 10 else ''}")
    for key, columns in list(d.different.items())[:10]:
        print(f"  different: {key}: {', '.join(columns)}")
    if len(d.different) > 10:
        print(f"  ... and {len(d.different) - 10} more different")
    for key, age in list(r.lagging.items())[:10]:
        print(f"  lagging: {key}: the source changed while the target stood still for {age:.0f} s")
    if r.in_flight:
        print(f"  in flight (still changing, not reported): {len(r.in_flight)}")
    for day, (s, t) in sorted(r.day_counts.items(), key=str)[:10]:
        print(f"  day {day}: {s} rows in PostgreSQL, {t} in {r.target}")


def _reconcile_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime, timedelta

    import psycopg
    from elasticsearch import Elasticsearch

    from knowton_pipeline.lib import clickhouse
    from knowton_pipeline.lib.reconcile.engine import ReconcileOptions
    from knowton_pipeline.lib.reconcile.record import mark_repaired, record_result
    from knowton_pipeline.lib.reconcile.run import plan_pairs, reconcile_pair, repair_result, result_keys

    pairs = plan_pairs(None if args.table == "all" else [args.table], None if args.target == "all" else [args.target])
    mode = "full" if args.full else "incremental" if args.incremental else "checksum"
    options = ReconcileOptions(
        mode=mode,  # type: ignore[arg-type]
        threshold=args.threshold,
        window=timedelta(minutes=args.window_minutes),
        settle_seconds=args.settle,
        stuck_seconds=args.stuck,
    )
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.json else (lambda m: None)
    reports: list[dict[str, Any]] = []
    remaining_drift = False
    es = Elasticsearch(settings.es_url, request_timeout=120)
    try:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            ch = clickhouse.get_client(settings.clickhouse_dsn) if any(t == "clickhouse" for _, t in pairs) else None
            for name, target in pairs:
                started = datetime.now(UTC)
                result = reconcile_pair(name, target, conn=conn, clickhouse=ch, es=es, options=options, on_progress=say)
                report = result.as_dict()
                if not args.no_record:
                    report["reconcile_id"] = record_result(conn, result, started_at=started)
                if not args.json:
                    _print_result(result)
                if args.repair and not result.clean:
                    repaired = repair_result(result, conn=conn, clickhouse=ch, es=es, max_keys=args.max_repair_keys)
                    report["repair"] = repaired.as_dict()
                    if not args.no_record:
                        mark_repaired(conn, report["reconcile_id"], result_keys(result), repaired.still_different)
                    if not args.json:
                        state = (
                            "verified clean" if repaired.verified else f"{len(repaired.still_different)} still differ"
                        )
                        print(f"  repaired {repaired.requested} key(s) at LSN {repaired.snapshot_lsn}: {state}")
                    remaining_drift |= not repaired.verified
                else:
                    remaining_drift |= not result.clean
                reports.append(report)
    finally:
        es.close()
    if args.json:
        print(json.dumps(reports, indent=2))
    return 1 if remaining_drift else 0


def _env_cmd(args: argparse.Namespace, settings: Settings) -> int:
    env = settings.export_env(include_secrets=True)
    env["DAGSTER_HOME"] = str(settings.dagster_home)
    for k, v in sorted(env.items()):
        print(f"export {k}={shlex.quote(v)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knowton", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stack", help="the local stack: up | down | status | logs")
    st.add_argument("action", choices=["up", "down", "status", "logs"])
    st.add_argument("components", nargs="*", help="postgres, kafka, connect, elasticsearch (default: all)")
    st.add_argument("--json", action="store_true", help="status: machine-readable output")
    st.add_argument("-n", "--lines", type=int, default=40, help="logs: how many lines per component")
    st.set_defaults(func=_stack_cmd)

    sc = sub.add_parser("schema", help="apply the PostgreSQL, ClickHouse and Elasticsearch schemas (idempotent)")
    sc.add_argument("action", choices=["apply"])
    sc.add_argument("stores", nargs="*", help="postgres, clickhouse, elasticsearch (default: all)")
    sc.set_defaults(func=_schema_cmd)

    co = sub.add_parser("connectors", help="Kafka Connect connectors from connectors/*.json")
    co.add_argument("action", choices=["deploy", "status"])
    co.add_argument("--dry-run", action="store_true", help="deploy: report what would change, change nothing")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=_connectors_cmd)

    se = sub.add_parser("seed", help="load deterministic demo data into PostgreSQL (COPY)")
    se.add_argument("--users", type=int, default=10_000)
    se.add_argument("--contents", type=int, default=20_000)
    se.add_argument("--purchases", type=int, default=100_000)
    se.add_argument("--seed", type=int, default=42)
    se.add_argument("--replace", action="store_true", help="truncate the tables first")
    se.add_argument("--if-empty", action="store_true", help="do nothing when the tables already hold data")
    se.add_argument("--quiet", action="store_true", help="no progress bar")
    se.set_defaults(func=_seed_cmd)

    sy = sub.add_parser("sync", help="apply CDC events to ClickHouse and Elasticsearch (the worker)")
    sy.add_argument("action", choices=["run"])
    sy.add_argument("--once", action="store_true", help="stop when caught up instead of running until stopped")
    sy.add_argument("--batch-size", type=int, default=2000)
    sy.set_defaults(func=_sync_cmd)

    rc = sub.add_parser(
        "reconcile",
        help="compare tables with their ClickHouse mirrors and search indices: exit 0 clean, 1 drift, 2 error",
        description=(
            "Compare PostgreSQL with ClickHouse and Elasticsearch and list the exact differing keys. Exit code 0: "
            "clean; 1: drift found (with --repair: drift that repair did not fix); 2: error, no verdict."
        ),
    )
    rc.add_argument("--table", default="all", help="User, Content, Purchase, user_activity, content_sales_daily or all")
    rc.add_argument("--target", default="all", help="clickhouse, elasticsearch or all (default)")
    how = rc.add_mutually_exclusive_group()
    how.add_argument("--full", action="store_true", help="also stream and hash every search document")
    how.add_argument("--incremental", action="store_true", help="only rows changed in the last --window-minutes")
    rc.add_argument("--window-minutes", type=float, default=60.0, help="incremental window (plus a 5 min margin)")
    rc.add_argument("--threshold", type=int, default=256, help="segment size compared row by row")
    rc.add_argument("--settle", type=float, default=5.0, help="seconds before differences are re-checked (0: never)")
    rc.add_argument(
        "--stuck",
        type=float,
        default=60.0,
        help="a key whose source changes while its target stands still this many seconds is reported as lagging",
    )
    rc.add_argument("--repair", action="store_true", help="re-sync the differing keys from PostgreSQL and re-verify")
    rc.add_argument("--max-repair-keys", type=int, default=10_000, help="refuse to repair more keys than this")
    rc.add_argument("--no-record", action="store_true", help="do not store the result in ops.reconcile_runs")
    rc.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    rc.set_defaults(func=_reconcile_cmd)

    en = sub.add_parser("env", help="print `export` lines for the settings (for dagster commands)")
    en.set_defaults(func=_env_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from knowton_pipeline.catalog import UnknownTableError
    from knowton_pipeline.lib.clickhouse import ClickHouseLockedError
    from knowton_pipeline.stack.components import StackError

    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    try:
        settings = Settings.from_env()
        return args.func(args, settings)
    except (SettingsError, StackError, ClickHouseLockedError, UnknownTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return 130
    except Exception as exc:  # a store that is down, a bad file: one clear line, not a traceback
        from knowton_pipeline.lib.errors import describe_error

        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
