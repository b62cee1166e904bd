"""`knowton stack up | down | status | logs`: bring the real components up healthy, report, stop."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings
from knowton_pipeline.stack.components import (
    COMPONENTS,
    Component,
    Health,
    Postgres,
    StackError,
    find_java,
    port_free,
)
from knowton_pipeline.stack.process import ProcessRecord, pid_alive, spawn, stop

Echo = Callable[[str], None]


@dataclass
class ComponentStatus:
    name: str
    state: str  # "running", "stopped", "unhealthy", "embedded", "in-use", "remote"
    address: str
    pid: int | None
    detail: str
    log: str | None


class Stack:
    def __init__(self, settings: Settings, echo: Echo = print):
        self.settings = settings
        self.echo = echo
        self.components: dict[str, Component] = {c.name: c(settings) for c in COMPONENTS}

    # --- selection -----------------------------------------------------------------------
    def select(self, names: Iterable[str] | None) -> list[Component]:
        wanted = list(names or self.components)
        unknown = [n for n in wanted if n not in self.components]
        if unknown:
            raise StackError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(self.components)}")
        closure: set[str] = set()

        def add(n: str) -> None:
            closure.add(n)
            for d in self.components[n].depends_on:
                add(d)

        for n in wanted:
            add(n)
        return [c for name, c in self.components.items() if name in closure]

    def record_path(self, c: Component) -> Path:
        return self.settings.home / "run" / f"{c.name}.json"

    def record(self, c: Component) -> ProcessRecord | None:
        rec = ProcessRecord.load(self.record_path(c))
        if rec is not None and pid_alive(rec.pid, rec.marker):
            return rec
        return None

    def marker(self, c: Component) -> str:
        return str(c.dir) + "/"

    # --- up ------------------------------------------------------------------------------
    def up(self, names: Iterable[str] | None = None) -> list[ComponentStatus]:
        t0 = time.monotonic()
        selected = self.select(names)
        self.settings.home.mkdir(parents=True, exist_ok=True)
        running = {c.name: self.record(c) for c in selected}
        to_start = [c for c in selected if running[c.name] is None]

        # Everything that can be checked before starting anything: fail fast, start nothing.
        taken = [
            f"{port} ({setting}, for {c.name})"
            for c in to_start
            for setting, port in c.ports().items()
            if not port_free(port)
        ]
        if taken:
            raise StackError(
                "port(s) already in use by another process: "
                + "; ".join(taken)
                + ". Stop whatever holds them or choose other ports through those KNOWTON_* variables."
            )
        java = None
        if any(c.needs_java for c in to_start):
            java, _ = find_java()
            self.ensure_jars()
        user = self.stack_user() if any(c.runs_unprivileged for c in to_start) else None

        started: dict[str, float] = {}
        pending = list(to_start)
        healthy: set[str] = {c.name for c in selected if running[c.name] is not None}
        deadline = time.monotonic() + int(self.settings["KNOWTON_STACK_TIMEOUT"])
        last: dict[str, Health] = {}
        while pending or len(healthy) < len(selected):
            for c in list(pending):
                if all(d in healthy for d in c.depends_on):
                    c.prepare(user if c.runs_unprivileged else None)
                    spawn(
                        c.name,
                        c.command(java),
                        log=c.log,
                        record_path=self.record_path(c),
                        marker=self.marker(c),
                        env=c.environment(java),
                        cwd=c.dir,
                        user=user if c.runs_unprivileged else None,
                    )
                    started[c.name] = time.monotonic()
                    pending.remove(c)
            for c in selected:
                if c.name in healthy or c.name not in started:
                    continue
                if self.record(c) is None:
                    raise StackError(f"{c.name} exited during start-up; see its log {c.log}:\n{tail(c.log, 15)}")
                h = c.health()
                last[c.name] = h
                if h.ok:
                    healthy.add(c.name)
                    if isinstance(c, Postgres):
                        c.bootstrap()
                    self.echo(
                        f"  {c.name:<14} healthy after {time.monotonic() - started[c.name]:5.1f} s   {c.address()}"
                    )
            if time.monotonic() > deadline:
                late = [c for c in selected if c.name not in healthy]
                msgs = [
                    f"{c.name} did not become healthy within {self.settings['KNOWTON_STACK_TIMEOUT']} s "
                    f"(last probe: {last.get(c.name, Health(False, 'never started')).detail}); "
                    f"see its log {c.log}:\n{tail(c.log, 15)}"
                    for c in late
                ]
                raise StackError("\n".join(msgs))
            if len(healthy) < len(selected):
                time.sleep(0.5)
        statuses = self.status([c.name for c in selected])
        self.echo(f"stack up in {time.monotonic() - t0:.1f} s (state and logs in {self.settings.home})")
        return statuses

    def ensure_jars(self) -> None:
        dist = self.settings.home / "dist"
        needed = [
            self.components["kafka"].libs,  # type: ignore[attr-defined]
            self.components["connect"].plugins / "debezium-connector-postgres",  # type: ignore[attr-defined]
            self.components["elasticsearch"].distribution / "bin",  # type: ignore[attr-defined]
        ]
        if all(p.exists() for p in needed):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "Maven (`mvn`) is needed once to fetch the Kafka, Debezium and Elasticsearch jars; "
                "install it (Debian: apt-get install maven)"
            )
        self.echo(f"resolving Kafka, Debezium and Elasticsearch from Maven Central into {dist} ...")
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(PROJECT_ROOT / "stack" / "pom.xml"),
                "package",
                f"-Dstack.home={self.settings.home}",
            ],
            capture_output=True,
            text=True,
        )
        missing = [str(p) for p in needed if not p.exists()]
        if result.returncode != 0 or missing:
            raise StackError(
                f"resolving the stack's jars with Maven failed (exit {result.returncode}, missing: "
                f"{', '.join(missing) or 'nothing'}):\n{(result.stdout + result.stderr)[-2000:]}"
            )

    def stack_user(self) -> str | None:
        """When run as root, the unprivileged user PostgreSQL and Elasticsearch run as (created if absent)."""
        if os.geteuid() != 0:
            return None
        user = self.settings["KNOWTON_STACK_USER"]
        try:
            pwd.getpwnam(user)
        except KeyError:
            result = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise StackError(
                    f"could not create the unprivileged user {user!r} (KNOWTON_STACK_USER): {result.stderr.strip()}"
                ) from None
        for parent in [self.settings.home, *self.settings.home.parents]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise StackError(
                    f"PostgreSQL and Elasticsearch run as {user!r}, who cannot enter {parent} (mode "
                    f"{stat.filemode(mode)}); set KNOWTON_HOME to a folder outside it or `chmod o+x {parent}`"
                )
        return user

    # --- down ----------------------------------------------------------------------------
    def down(self, names: Iterable[str] | None = None) -> list[str]:
        selected = list(names) if names else list(self.components)
        stopped = []
        for c in reversed([c for c in self.components.values() if c.name in selected]):
            rec = ProcessRecord.load(self.record_path(c))
            if rec is None:
                continue
            if stop(rec, sig=c.stop_signal, timeout=60):
                stopped.append(c.name)
                self.echo(f"  {c.name:<14} stopped (pid {rec.pid})")
            self.record_path(c).unlink(missing_ok=True)
        if not stopped:
            self.echo("nothing was running")
        return stopped

    # --- status --------------------------------------------------------------------------
    def status(self, names: Iterable[str] | None = None) -> list[ComponentStatus]:
        out = []
        for c in self.components.values():
            if names and c.name not in names:
                continue
            rec = self.record(c)
            if rec is None:
                out.append(ComponentStatus(c.name, "stopped", c.address(), None, "", str(c.log)))
                continue
            h = c.health()
            out.append(
                ComponentStatus(c.name, "running" if h.ok else "unhealthy", c.address(), rec.pid, h.detail, str(c.log))
            )
        if not names or "clickhouse" in names:
            out.append(self.clickhouse_status())
        return out

    def clickhouse_status(self) -> ComponentStatus:
        dsn = self.settings.clickhouse_dsn
        if not dsn.startswith("chdb://"):
            return ComponentStatus("clickhouse", "remote", clickhouse.redact(dsn), None, "ClickHouse server", None)
        holder = clickhouse.lock_holder(clickhouse.embedded_path(dsn))
        if holder is not None:
            return ComponentStatus("clickhouse", "in-use", dsn, holder, f"embedded engine open in pid {holder}", None)
        return ComponentStatus("clickhouse", "embedded", dsn, None, "embedded engine (chDB), opened in-process", None)


def tail(path: Path | str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def status_dicts(statuses: list[ComponentStatus]) -> list[dict[str, object]]:
    return [asdict(s) for s in statuses]
