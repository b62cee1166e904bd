"""Fault drill: each fault of issue 13 while rows are written, healed by the project alone, then proven clean.

    eval "$(.venv/bin/knowton env)" && .venv/bin/python benchmarks/fault_drills.py [--faults a,b,...]
        [--outage-seconds 60] [--rate 10] [--incremental-cron '*/2 * * * *'] [--full-cron '*/5 * * * *']

Needs the demo stack up with its data (`knowton stack up; knowton schema apply; knowton connectors deploy;
knowton seed --if-empty`) and no Dagster daemon on that instance: the drill starts `dagster-daemon run` on the
project's code location itself (the sensors and schedules as shipped), with two differences it prints in its
header: alerts go to a webhook the drill serves and counts, and the reconciliation schedules run on a cycle of
minutes (KNOWTON_RECONCILE_INCREMENTAL_CRON, KNOWTON_RECONCILE_FULL_CRON) instead of hourly and daily. It stops
that daemon at the end.

A background writer inserts, updates and deletes `User` rows at `--rate` operations per second throughout. Per
fault the drill injects it, and where a fault is an outage, ends it after `--outage-seconds` (restarts the
component, lifts the block, removes the refused-record cause, puts the alias back); nothing else is done by hand.
It then observes, without repairing: it launches the `reconcile` job in full mode with `repair: false` (tagged
`knowton/drill: observer`, queued in the `clickhouse` pool like any run) until one reports every table and
store clean. Reported per fault:
  detected after   injection -> the first sign the project noticed: an alert, a failed check, a run launched
                   by a sensor or schedule to act on it (restart, heal, DLQ replay, a reconciliation that found
                   drift); "-" when the fault healed before anything noticed;
  healed after     injection -> the start of the first clean observer run (an upper bound: observers run one
                   after another), and the same from the moment the drill ended the outage;
  rows written     writer operations committed between injection and that clean observer;
  rows lost        keys written during the fault that the last observer still found missing or different
                   (0 when it is clean);
  alerts           webhook alerts received during the fault, the observer's own failed checks left out.
The two faults found only by reconciliation (rows deleted from the ClickHouse mirror, a search document edited)
touch rows the writer changed in the last minutes, so the incremental cycle sees the first; only the full cycle
streams documents, so only it sees the second. The mirror rows are deleted with the daemon stopped for a moment
(the embedded ClickHouse engine opens in one process at a time); its detection time includes the restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from knowton_pipeline.lib.health.connect import ConnectorHealth, connector_from_status
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OBSERVER_TAG = "knowton/drill"
CDC_CONNECTOR = "postgres-cdc-source-connector"
# Runs a sensor or schedule launches to act on a fault (apply_cdc runs all the time and tells nothing).
ACTING_JOBS = ("restart_failed_connectors", "heal_replication", "reprocess_dlq")
TOUCHED_KEYS = 20  # rows deleted from the mirror / documents edited


# --------------------------------------------------------------------------------------------------------------
# Pure accounting (tested in knowton_pipeline_tests/test_fault_drills.py)


@dataclass(frozen=True)
class Write:
    at: float
    key: str
    op: str  # "insert", "update", "delete"


@dataclass(frozen=True)
class Received:
    at: float
    title: str
    run: str


@dataclass
class Outcome:
    fault: str
    injected: float
    cause_removed: float | None = None
    detected: float | None = None
    detected_by: str = ""
    healed: float | None = None
    writes: int = 0
    lost: int | None = None
    other_drift: int = 0
    alerts: int = 0
    note: str = ""
    touched: list[str] = field(default_factory=list)
    touched_in: str = ""  # the store whose records the fault changed behind the pipeline's back


def writes_between(writes: Iterable[Write], start: float, end: float) -> list[Write]:
    return [w for w in writes if start <= w.at <= end]


def rows_lost(written: Iterable[Write], differing_keys: Iterable[str]) -> int:
    """Keys written during the fault that a reconciliation after it still finds missing or different."""
    return len({w.key for w in written} & set(differing_keys))


def alerts_of_the_pipeline(alerts: Sequence[Received], observer_runs: set[str]) -> list[Received]:
    """Alerts the pipeline sent about the fault: the observer's own failed checks, and their recoveries, left out."""
    kept, from_observer = [], set()
    for a in alerts:
        subject = a.title.removeprefix("Recovered: ").removesuffix(" failed")
        if a.run in observer_runs:
            from_observer.add(subject)
            continue
        if a.title.startswith("Recovered: ") and subject in from_observer:
            from_observer.discard(subject)
            continue
        kept.append(a)
    return kept


def _seconds(at: float | None, since: float | None) -> str:
    return "-" if at is None or since is None else f"{at - since:.0f} s"


HEADER = (
    "fault",
    "detected after",
    "detected by",
    "healed after",
    "after cause removed",
    "rows written",
    "rows lost",
    "alerts",
)


def table_rows(outcomes: Sequence[Outcome]) -> list[tuple[str, ...]]:
    rows = []
    for o in outcomes:
        healed = _seconds(o.healed, o.injected) if o.healed is not None else "not healed"
        lost = "?" if o.lost is None else str(o.lost)
        rows.append(
            (
                o.fault,
                _seconds(o.detected, o.injected),
                o.detected_by or "-",
                healed,
                _seconds(o.healed, o.cause_removed),
                str(o.writes),
                lost,
                str(o.alerts),
            )
        )
    return rows


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A Markdown table, README-ready."""
    rows = [HEADER, *table_rows(outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    line = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    line.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(line)


# --------------------------------------------------------------------------------------------------------------
# The world the drill drives


class AlertReceiver:
    """The alert webhook: records each alert with the time it arrived."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                attachment = (body.get("attachments") or [{}])[0]
                run = next((f["value"] for f in attachment.get("fields", []) if f.get("title") == "run"), "")
                received.append(Received(time.time(), attachment.get("title") or body.get("text", ""), run))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/drill"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def since(self, start: float, end: float) -> list[Received]:
        return [a for a in list(self.received) if start <= a.at <= end]


class Writer:
    """Steady writes to "User": mostly inserts, every 4th an update of a recent row, every 10th a delete."""

    def __init__(self, conninfo: Mapping[str, Any], rate: float) -> None:
        self.conninfo, self.rate = dict(conninfo), rate
        self.writes: list[Write] = []
        self.live: list[str] = []
        self.errors = 0
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        import psycopg

        n = 0
        conn = None
        while not self.stop.wait(1.0 / self.rate):
            if self.paused.is_set():
                continue
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(**self.conninfo, autocommit=True)
                n += 1
                if n % 10 == 0 and len(self.live) > 50:
                    key = self.live.pop(random.randrange(len(self.live) - 40))
                    conn.execute('DELETE FROM "User" WHERE address = %s', (key,))
                    op = "delete"
                elif n % 4 == 0 and self.live:
                    key = random.choice(self.live[-200:])
                    conn.execute('UPDATE "User" SET reputation = reputation + 1 WHERE address = %s', (key,))
                    op = "update"
                else:
                    key = "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
                    conn.execute(
                        'INSERT INTO "User" (address, username, reputation) VALUES (%s, %s, 1)',
                        (key, f"drill-{key[2:16]}"),
                    )
                    self.live.append(key)
                    op = "insert"
                self.writes.append(Write(time.time(), key, op))
            except Exception:  # the writer keeps going; a failed write is not counted
                self.errors += 1
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None

    def recent(self, older_than: float, count: int) -> list[str]:
        """Live keys inserted more than `older_than` seconds ago, newest first."""
        cutoff = time.time() - older_than
        live = set(self.live)
        keys = [w.key for w in reversed(self.writes) if w.op == "insert" and w.at < cutoff and w.key in live]
        return keys[:count]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class Daemon:
    """The Dagster daemon on the project's code location, started and stopped by the drill."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        self.env, self.log = dict(env), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(PROJECT_ROOT / ".venv/bin/dagster-daemon"), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Drill:
    settings: Any
    stack: Any
    es: Any
    instance: Any
    env: dict[str, str]
    daemon: Daemon
    writer: Writer
    receiver: AlertReceiver
    outage: float
    heal_timeout: float
    check_keys: list[Any]
    observer_runs: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print

    # --- observing -------------------------------------------------------------------------------------------
    def runs_since(self, since: float, jobs: Sequence[str] | None = None) -> list[Any]:
        import dagster as dg

        records = self.instance.get_run_records(
            dg.RunsFilter(created_after=datetime.fromtimestamp(since, UTC), job_name=None), limit=500
        )
        return [
            r
            for r in records
            if (jobs is None or r.dagster_run.job_name in jobs)
            and r.dagster_run.tags.get(OBSERVER_TAG) is None
            and (r.dagster_run.tags.get("dagster/sensor_name") or r.dagster_run.tags.get("dagster/schedule_name"))
        ]

    def run_created(self, run_id: str) -> float:
        """When a Dagster run was created; 0 when unknown."""
        record = self.instance.get_run_record_by_id(run_id)
        return record.create_timestamp.timestamp() if record is not None else 0.0

    def detection(self, since: float, touched: Sequence[str], store: str = "") -> tuple[float, str] | None:
        """The first sign after `since` that the project noticed something."""
        import psycopg

        signs: list[tuple[float, str]] = []
        for a in alerts_of_the_pipeline(self.receiver.since(since, time.time()), self.observer_runs):
            if a.title.startswith("Recovered: "):  # news of an earlier failure, not of this fault
                continue
            if a.run and self.run_created(a.run) < since:  # a run that began before the fault (or the drill's pause)
                continue
            signs.append((a.at, f"alert: {a.title[:40]}"))
        for r in self.runs_since(since, ACTING_JOBS):
            signs.append((r.create_timestamp.timestamp(), f"run {r.dagster_run.job_name}"))
        latest = self.instance.event_log_storage.get_latest_asset_check_execution_by_key(self.check_keys)
        for key, record in latest.items():
            failed = record.status.value == "FAILED" and record.create_timestamp >= since
            if failed and record.run_id not in self.observer_runs:
                signs.append((record.create_timestamp, f"check {key.name} failed"))
        with psycopg.connect(**self.settings.pg_conninfo(), autocommit=True) as conn:
            # Scheduled reconciliations also report the rows written just before they ran (the embedded ClickHouse
            # sink waits while one holds the engine), so only the keys the fault touched count as its detection.
            found = conn.execute(
                "SELECT extract(epoch FROM r.started_at), r.table_name, r.target FROM ops.reconcile_runs r "
                "JOIN ops.reconcile_diffs d ON d.reconcile_id = r.id "
                "WHERE r.started_at >= to_timestamp(%s) AND d.key = ANY(%s) AND r.dagster_run_id <> ALL(%s) "
                "AND (r.target = %s OR %s = '') ORDER BY r.started_at LIMIT 1",
                (since, list(touched) or [""], list(self.observer_runs) or [""], store, store),
            ).fetchall()
        for at, name, target in found:
            signs.append((float(at), f"reconcile: {name} in {target}"))
        return min(signs) if signs else None

    def observe(self) -> tuple[str, float, list[str], int]:
        """Run a full, read-only reconciliation of everything through Dagster; (run id, started, differing keys,
        unfinished pairs)."""
        import dagster as dg
        import psycopg

        marker = f"observer-{uuid.uuid4().hex[:8]}"
        config = {
            "ops": {"reconcile_stores": {"config": {"mode": "full", "repair": False, "repair_reason": "fault drill"}}}
        }
        cmd = [
            str(PROJECT_ROOT / ".venv/bin/dagster"),
            "job",
            "launch",
            "-w",
            str(PROJECT_ROOT / "workspace.yaml"),
            "-j",
            "reconcile",
            "--config-json",
            json.dumps(config),
            "--tags",
            json.dumps({OBSERVER_TAG: marker}),
        ]
        subprocess.run(cmd, cwd=PROJECT_ROOT, env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + self.heal_timeout
        while True:
            runs = self.instance.get_run_records(dg.RunsFilter(tags={OBSERVER_TAG: marker}), limit=1)
            if runs:
                self.observer_runs.add(runs[0].dagster_run.run_id)
            if runs and runs[0].dagster_run.is_finished:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("an observer reconciliation did not finish in time")
            time.sleep(2)
        record = runs[0]
        run_id = record.dagster_run.run_id
        with psycopg.connect(**self.settings.pg_conninfo(), autocommit=True) as conn:
            pairs = conn.execute(
                "SELECT id, extract(epoch FROM started_at) FROM ops.reconcile_runs WHERE dagster_run_id = %s", (run_id,)
            ).fetchall()
            keys = conn.execute(
                "SELECT DISTINCT d.key FROM ops.reconcile_diffs d JOIN ops.reconcile_runs r ON r.id = d.reconcile_id "
                "WHERE r.dagster_run_id = %s",
                (run_id,),
            ).fetchall()
        started = min((float(p[1]) for p in pairs), default=record.start_time or time.time())
        unfinished = 0 if record.dagster_run.status == dg.DagsterRunStatus.SUCCESS else 1
        return run_id, started, [k[0] for k in keys], unfinished

    def wait_caught_up(self, timeout: float) -> None:
        """Until both sinks' groups have no lag (or the timeout: the observer then reports what is missing)."""
        from knowton_pipeline.catalog import TABLES
        from knowton_pipeline.lib.sync.apply import group_lag, sink_group

        # Heartbeats keep coming while the writer pauses; only the data topics must be applied.
        topics = [t.topic for t in TABLES]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                lags = [
                    group_lag(self.settings.kafka_bootstrap, sink_group(s), topics)
                    for s in ("clickhouse", "elasticsearch")
                ]
                if not any(sum(lag.values()) for lag in lags):
                    return
            except Exception:  # Kafka or Connect mid-restart: try again
                pass
            time.sleep(3)

    def wait_for_runs(self, since: float, jobs: Sequence[str], deadline: float) -> None:
        """Until a run of `jobs` launched by the project after `since` has finished (or the deadline)."""
        while time.monotonic() < deadline:
            runs = self.runs_since(since, jobs)
            if any(r.dagster_run.is_finished for r in runs):
                return
            time.sleep(3)

    def heal(self, outcome: Outcome, waits_for: Sequence[str]) -> None:
        deadline = time.monotonic() + self.heal_timeout
        if waits_for:
            self.wait_for_runs(outcome.injected, waits_for, deadline)
        time.sleep(10)
        while True:
            # The writer pauses while the observer reconciles: a reconciliation holds the embedded engine, so the
            # ClickHouse sink cannot apply meanwhile and the last seconds of writes would read as missing.
            self.writer.paused.set()
            time.sleep(3)
            try:
                self.wait_caught_up(timeout=180)
                run_id, started, keys, unfinished = self.observe()
            finally:
                self.writer.paused.clear()
            fault_writes = writes_between(self.writer.writes, outcome.injected, started)
            outcome.lost = rows_lost(fault_writes, keys)
            outcome.other_drift = len(set(keys) - {w.key for w in fault_writes})
            self.log(f"    observer {run_id[:8]}: {len(keys)} differing key(s), {unfinished} unfinished")
            if not keys and not unfinished:
                outcome.healed = started
                return
            if time.monotonic() > deadline:
                outcome.note = f"gave up after {self.heal_timeout:.0f} s; last observer {run_id}"
                return
            time.sleep(20)

    # --- helpers for the faults ------------------------------------------------------------------------------
    def cdc_health(self) -> ConnectorHealth | None:
        """The CDC connector's health as the project reads it; None when Connect does not answer."""
        try:
            status = KafkaConnectClient(self.settings.connect_url).status(CDC_CONNECTOR)
        except Exception:  # Connect down: nothing to report
            return None
        return connector_from_status(CDC_CONNECTOR, status or {})

    def connector_running(self) -> bool:
        health = self.cdc_health()
        return health is not None and health.healthy

    def task_failed(self) -> bool:
        health = self.cdc_health()
        return health is not None and any(t.state == "FAILED" for t in health.tasks)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def until(self, at: float) -> None:
        time.sleep(max(0.0, at - time.time()))


# --------------------------------------------------------------------------------------------------------------
# The faults: each injects, ends the outage where it is one, and returns when the drill's part is done.


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    run: Callable[[Drill, Outcome], None]
    waits_for: tuple[str, ...] = ()


def connect_killed(d: Drill, o: Outcome) -> None:
    component = d.stack.components["connect"]
    record = d.stack.record(component)
    o.injected = time.time()
    os.killpg(record.pid, signal.SIGKILL)
    d.until(o.injected + d.outage)
    d.stack.up(["connect"])
    o.cause_removed = time.time()


@contextlib.contextmanager
def _topic_limit(settings: Any, topic: str, value: str | None) -> Iterator[None]:
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})

    def alter(op: AlterConfigOpType, v: str) -> None:
        entry = ConfigEntry("max.message.bytes", v, incremental_operation=op)
        for future in admin.incremental_alter_configs(
            [ConfigResource("topic", topic, incremental_configs=[entry])]
        ).values():
            future.result(timeout=30)

    alter(AlterConfigOpType.SET, value or "64")
    try:
        yield
    finally:
        alter(AlterConfigOpType.DELETE, "")


def debezium_task_failed(d: Drill, o: Outcome) -> None:
    # The broker refuses every cdc-User record (RecordTooLargeException): Connect cannot retry that, the task FAILS.
    o.injected = time.time()
    with _topic_limit(d.settings, "cdc-User", "64"):
        d.wait(d.task_failed, timeout=120, what="the Debezium task FAILED")
        o.note = f"task FAILED {time.time() - o.injected:.0f} s after the limit"
        d.until(o.injected + d.outage)
    o.cause_removed = time.time()


def elasticsearch_stopped(d: Drill, o: Outcome) -> None:
    o.injected = time.time()
    d.stack.down(["elasticsearch"])
    d.until(o.injected + d.outage)
    d.stack.up(["elasticsearch", "sink-elasticsearch"])
    o.cause_removed = time.time()


def write_block(d: Drill, o: Outcome) -> None:
    o.injected = time.time()
    d.es.indices.add_block(index="knowton-users", block="write")
    try:
        d.until(o.injected + d.outage)
    finally:
        d.es.indices.put_settings(index="knowton-users", settings={"index.blocks.write": None})
    o.cause_removed = time.time()


def poison_record(d: Drill, o: Outcome) -> None:
    # The cause: the users alias points at an index whose mapping refuses the documents, so each User change is
    # poison for Elasticsearch (dead-lettered) while ClickHouse applies it. The fix: the alias back.
    from knowton_pipeline.lib.stores.elasticsearch import alias_body

    broken = f"knowton-users-drill-{uuid.uuid4().hex[:6]}"
    d.es.indices.create(index=broken, mappings={"dynamic": "strict", "properties": {"reputation": {"type": "boolean"}}})
    (good,) = d.es.indices.get_alias(name="knowton-users")
    o.injected = time.time()
    d.es.indices.update_aliases(
        actions=[
            {"remove": {"index": good, "alias": "knowton-users"}},
            {"add": {"index": broken, "alias": "knowton-users", "is_write_index": True}},
        ]
    )
    try:
        d.until(o.injected + d.outage)
    finally:
        d.es.indices.update_aliases(
            actions=[
                {"remove": {"index": broken, "alias": "knowton-users"}},
                {"add": {"index": good, "alias": "knowton-users", **alias_body()}},
            ]
        )
        d.es.indices.delete(index=broken)
    o.cause_removed = time.time()


_DELETE_MIRROR_ROWS = """
import json, sys
from knowton_pipeline.lib import clickhouse
dsn, keys = sys.argv[1], json.loads(sys.argv[2])
with clickhouse.connection(dsn) as ch:
    held = ch.query(
        "SELECT address FROM knowton.users FINAL WHERE address IN {a:Array(String)}", parameters={"a": keys}
    ).result_rows
    keys = [r[0] for r in held]
    ch.command(
        "ALTER TABLE knowton.users DELETE WHERE address IN {a:Array(String)}",
        parameters={"a": keys},
        settings={"mutations_sync": 2},
    )
print(json.dumps(keys))
"""


def clickhouse_rows_deleted(d: Drill, o: Outcome) -> None:
    import dagster as dg

    from knowton_pipeline.lib import clickhouse

    keys = d.writer.recent(older_than=60, count=TOUCHED_KEYS)
    d.daemon.stop()
    try:
        active = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
        d.wait(
            lambda: (
                not d.instance.get_run_records(dg.RunsFilter(statuses=active), limit=1)
                and clickhouse.lock_holder(clickhouse.embedded_path(d.settings.clickhouse_dsn)) is None
            ),
            timeout=600,
            what="no run holding the embedded ClickHouse engine",
        )
        # In a process of its own: the embedded engine stays open for the life of the process that opens it, and
        # the drill must not keep it from the daemon's runs.
        done = subprocess.run(
            [sys.executable, "-c", _DELETE_MIRROR_ROWS, d.settings.clickhouse_dsn, json.dumps(keys)],
            cwd=PROJECT_ROOT,
            env=d.env,
            check=True,
            capture_output=True,
            text=True,
        )
        keys = json.loads(done.stdout)
        o.touched, o.touched_in = keys, "clickhouse"
        o.injected = time.time()
        o.note = f"{len(keys)} mirror rows deleted, changed in the last minutes"
    finally:
        d.daemon.start()


def document_edited(d: Drill, o: Outcome) -> None:
    keys = d.writer.recent(older_than=30, count=TOUCHED_KEYS)
    (index,) = d.es.indices.get_alias(name="knowton-users")
    o.injected = time.time()
    edited = 0
    for key in keys:
        with contextlib.suppress(Exception):
            d.es.update(index=index, id=key, doc={"bio": "edited in the index by the fault drill"})
            edited += 1
    o.touched, o.touched_in = keys, "elasticsearch"
    o.note = f"{edited} documents edited"


def slot_dropped(d: Drill, o: Outcome) -> None:
    import psycopg

    with psycopg.connect(**d.settings.pg_conninfo(), autocommit=True) as conn:
        o.injected = time.time()
        deadline = time.monotonic() + 60
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot'"
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot('knowton_cdc_slot')")
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def sink_killed(d: Drill, o: Outcome) -> None:
    from knowton_pipeline.lib.sync.service import SinkStatus

    sink = d.stack.components["sink-elasticsearch"]
    status = SinkStatus.load(sink.status_path)
    o.injected = time.time()
    os.kill(status.pid, signal.SIGKILL)  # the sink itself, not its supervisor


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("connect-killed", "Connect worker SIGKILLed, started again", connect_killed),
        Fault(
            "debezium-failed",
            "Debezium task FAILED (refused record), cause removed",
            debezium_task_failed,
            ("restart_failed_connectors",),
        ),
        Fault("es-stopped", "Elasticsearch stopped", elasticsearch_stopped),
        Fault("write-block", "index write block", write_block),
        Fault("poison", "poison records, cause fixed", poison_record, ("reprocess_dlq",)),
        Fault("ch-rows-deleted", "rows deleted from the ClickHouse mirror", clickhouse_rows_deleted, ("reconcile",)),
        Fault("doc-edited", "documents edited in the index", document_edited, ("reconcile",)),
        Fault("slot-dropped", "replication slot dropped", slot_dropped, ("heal_replication",)),
        Fault("sink-killed", "search sink process SIGKILLed", sink_killed),
    )
}


# --------------------------------------------------------------------------------------------------------------


def daemon_running(instance: Any) -> bool:
    """A daemon heartbeat newer than a minute, still there after a minute (one just stopped goes quiet)."""
    deadline = time.monotonic() + 75
    while time.monotonic() < deadline:
        beats = instance.get_daemon_heartbeats()
        if not any(time.time() - b.timestamp < 60 for b in beats.values()):
            return False
        time.sleep(5)
    return True


def run_fault(d: Drill, fault: Fault) -> Outcome:
    d.log(f"== {fault.name}: {fault.title}")
    outcome = Outcome(fault.name, injected=time.time())
    try:
        fault.run(d, outcome)
    except Exception as exc:  # reported in the table; the drill goes on
        outcome.note = f"injection failed: {exc}"
        d.log(f"    {outcome.note}")
    d.log(f"    injected; drill's part done after {time.time() - outcome.injected:.0f} s {outcome.note}")
    d.heal(outcome, fault.waits_for)
    end = outcome.healed or time.time()
    sign = d.detection(outcome.injected, outcome.touched, outcome.touched_in)
    if sign is not None and sign[0] <= end:
        outcome.detected, outcome.detected_by = sign
    outcome.writes = len(writes_between(d.writer.writes, outcome.injected, end))
    outcome.alerts = len(alerts_of_the_pipeline(d.receiver.since(outcome.injected, end), d.observer_runs))
    d.log("    " + " | ".join(table_rows([outcome])[0]))
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--outage-seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0, help="writer operations per second")
    parser.add_argument("--incremental-cron", default="*/2 * * * *")
    parser.add_argument("--full-cron", default="*/5 * * * *")
    parser.add_argument("--heal-timeout", type=float, default=900.0, help="seconds to wait for a fault to heal")
    args = parser.parse_args(argv)
    chosen = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")

    import dagster as dg
    from elasticsearch import Elasticsearch

    from knowton_pipeline.lib.settings import Settings
    from knowton_pipeline.stack.manager import Stack

    settings = Settings.from_env()
    receiver = AlertReceiver()
    env = {
        **os.environ,
        **settings.export_env(include_secrets=True),
        "DAGSTER_HOME": str(settings.dagster_home),
        "KNOWTON_ALERT_WEBHOOK_URL": receiver.url,
        "KNOWTON_RECONCILE_INCREMENTAL_CRON": args.incremental_cron,
        "KNOWTON_RECONCILE_FULL_CRON": args.full_cron,
    }
    os.environ.update(env)
    from knowton_pipeline.definitions import defs

    stack = Stack(settings, echo=lambda *_a, **_k: None)
    down = [s.name for s in stack.status() if s.state not in ("running", "embedded", "in-use", "remote")]
    if down:
        print(f"the stack is not fully up ({', '.join(down)}): run `knowton stack up` first", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    if daemon_running(instance):
        print(
            "a Dagster daemon already runs on this instance; stop it (the drill starts its own, with its webhook "
            "and reconciliation cycle)",
            file=sys.stderr,
        )
        return 2
    subprocess.run(
        [str(PROJECT_ROOT / ".venv/bin/dagster"), "instance", "concurrency", "set", "clickhouse", "1"],
        env=env,
        check=True,
        capture_output=True,
    )
    daemon = Daemon(env, settings.home / "fault-drill-daemon.log")
    writer = Writer(settings.pg_conninfo(), args.rate)
    drill = Drill(
        settings=settings,
        stack=stack,
        es=Elasticsearch(settings.es_url, request_timeout=30),
        instance=instance,
        env=env,
        daemon=daemon,
        writer=writer,
        receiver=receiver,
        outage=args.outage_seconds,
        heal_timeout=args.heal_timeout,
        check_keys=list(defs().get_repository_def().asset_graph.asset_check_keys),
        log=lambda m: print(m, flush=True),
    )
    outcomes: list[Outcome] = []
    started = time.time()

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stopped from outside: still restore, stop the daemon, print
    daemon.start()
    try:
        writer.start()
        print("baseline: waiting for the stores to be reconciled clean before the first fault", flush=True)
        baseline = Outcome("baseline", injected=time.time())
        drill.heal(baseline, ())
        if baseline.healed is None:
            print("the stores never reconciled clean before any fault; drill stopped", file=sys.stderr)
            return 1
        for name in chosen:
            outcomes.append(run_fault(drill, FAULTS[name]))
    except KeyboardInterrupt:
        print("interrupted: the table holds the faults that finished", flush=True)
    finally:
        writer.close()
        daemon.stop()
        with contextlib.suppress(Exception):
            stack.up(["elasticsearch", "connect", "sink-elasticsearch"])  # as found, whatever happened
    print()
    print(
        f"Fault drill, {time.time() - started:.0f} s, writer {args.rate:g} ops/s on User ({len(writer.writes)} "
        f"writes, {writer.errors} failed), outages {args.outage_seconds:g} s; daemon and sensors as shipped, "
        f"reconcile_hourly cron {args.incremental_cron!r} (incremental), reconcile_daily cron {args.full_cron!r} "
        "(full), alert throttle as shipped. 'healed after' counts to the start of the first clean full, read-only "
        "reconciliation (the writer pauses while it runs); 'after cause removed' from when the drill ended the outage."
    )
    print(format_table(outcomes))
    for o in outcomes:
        if o.note or o.other_drift:
            print(f"  {o.fault}: {o.note}" + (f"; {o.other_drift} other differing key(s)" if o.other_drift else ""))
    print()
    print("reproduce: " + shlex.join([".venv/bin/python", "benchmarks/fault_drills.py", *(argv or sys.argv[1:])]))
    return 0 if all(o.healed is not None and o.lost == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
