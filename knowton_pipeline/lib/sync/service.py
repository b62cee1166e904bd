"""The sink as a long-running service (`knowton sink run`): one store's `CdcSink` in its consumer group, restarted
after any failure with backoff, stopped cleanly by SIGTERM, and reporting how it is doing in a status file that
the stack's health probe (and a Kubernetes readiness probe) reads.

`supervise` is the outer layer the stack starts: it runs the service as a child process and starts it again when it
dies, whatever killed it, so a crash costs seconds of freshness and never needs a person."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.sync.apply import ApplyConfig, ApplyStats, CdcSink, sink_group

log = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 30.0  # a status not rewritten for this long belongs to a sink that hangs or died
TICK_SECONDS = 2.0  # how often an idle sink rewrites its status
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class SinkStatus:
    store: str
    group: str
    pid: int
    state: str = "starting"  # starting, running, retrying, stopped
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    partitions: list[str] = field(default_factory=list)
    events: int = 0
    written: int = 0
    dead_lettered: int = 0
    lag: int = 0
    restarts: int = 0
    last_error: str = ""

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)  # readers never see half a file

    @classmethod
    def load(cls, path: Path) -> SinkStatus | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def alive(self, now: float | None = None) -> bool:
        """Up and reporting: the process keeps rewriting its status (it may be waiting out a store)."""
        return self.state != "stopped" and (now or time.time()) - self.updated_at <= STALE_AFTER_SECONDS

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.updated_at
        if age > STALE_AFTER_SECONDS:
            return f"status not updated for {age:.0f} s (last state {self.state})"
        if self.state == "retrying":
            return f"retrying after {self.last_error}"
        return f"{self.state}: {len(self.partitions)} partition(s), lag {self.lag}, {self.events} events applied"


def serve(
    store: str,
    settings: Settings,
    *,
    status_path: Path | None,
    stop: threading.Event,
    batch_size: int | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the store's sink until `stop` is set; any failure is logged, waited out with backoff and retried."""
    status = SinkStatus(store=store, group=sink_group(store), pid=os.getpid())
    total = ApplyStats()

    def report(stats: ApplyStats, sink: CdcSink) -> None:
        status.state = "running"
        status.partitions = [f"{t}[{p}]" for t, p in sink.assignment]
        status.events = total.events + stats.events
        status.written = total.written[store] + stats.written[store]
        status.dead_lettered = total.dead_lettered[store] + stats.dead_lettered[store]
        status.lag = stats.lag
        status.last_error = ""
        if status_path is not None:
            status.save(status_path)

    def retrying(exc: BaseException) -> None:
        # A store outage waited out inside a batch: the sink is alive and says what it waits for.
        status.state, status.last_error = "retrying", f"{type(exc).__name__}: {exc}"
        if status_path is not None:
            status.save(status_path)

    if status_path is not None:
        status.save(status_path)
    backoff = 1.0
    config = ApplyConfig(bootstrap=settings.kafka_bootstrap, batch_size=batch_size)
    while not stop.is_set():
        try:
            # The store's client and nothing else: the search sink never opens ClickHouse.
            with TARGETS[store].connect(settings) as client:
                sink = CdcSink(
                    config,
                    store=store,
                    client=client,
                    pg_conninfo=settings.pg_conninfo(),
                    tick_seconds=TICK_SECONDS,
                )
                sink.on_progress = functools.partial(report, sink=sink)
                sink.on_retry = retrying
                echo(f"sink {store}: consuming in group {sink.group_id}")
                stats = sink.run(until_caught_up=False, stop=stop)
            total = ApplyStats.combined([total, stats])
            backoff = 1.0
        except Exception as exc:  # a sink outlives every failure; the status and the log say which
            status.state, status.last_error, status.restarts = (
                "retrying",
                f"{type(exc).__name__}: {exc}",
                status.restarts + 1,
            )
            if status_path is not None:
                status.save(status_path)
            echo(f"sink {store}: {status.last_error}; starting again in {backoff:.0f} s")
            log.debug("sink failure", exc_info=True)
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
    status.state = "stopped"
    if status_path is not None:
        status.save(status_path)
    echo(f"sink {store}: stopped after {status.events} events")
    return 0


def supervise(argv: Sequence[str], stop: threading.Event, echo: Callable[[str], None] = print) -> int:
    """Run `argv` (the service) as a child and start it again whenever it exits while `stop` is not set, waiting
    longer after quick deaths. SIGTERM to the supervisor is passed on, and the child is waited for."""
    backoff = 1.0
    while not stop.is_set():
        started = time.monotonic()
        child = subprocess.Popen(list(argv))
        while child.poll() is None:
            if stop.wait(0.5):
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return 0
        code = child.returncode
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF_SECONDS)
        echo(f"sink exited with {code}; starting it again in {backoff:.0f} s")
        stop.wait(backoff)
    return 0


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def service_argv(store: str, status_path: Path, *options: str) -> list[str]:
    """The command line of one sink service with its status file; `options` as `knowton sink run` takes them."""
    cli = [sys.executable, "-m", "knowton_pipeline.cli", "sink", "run"]
    return [*cli, "--store", store, "--status-file", str(status_path), *options]
