"""The local stack: healthy components, idempotent `up`, clean `down`, clear errors on bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from knowton_pipeline.lib.settings import PROJECT_ROOT, SPECS, Settings
from knowton_pipeline.stack.components import SERVERS
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import processes_mentioning

KNOWTON = [sys.executable, "-m", "knowton_pipeline.cli"]


def run_knowton(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KNOWTON_")}
    base.update(env or {})
    return subprocess.run(
        [*KNOWTON, *args], capture_output=True, text=True, env=base, timeout=timeout, cwd=PROJECT_ROOT
    )


def scratch_env(home: Path, offset: int) -> dict[str, str]:
    """Settings for a second stack on other ports, so it never touches the main one."""
    env = {"KNOWTON_HOME": str(home)}
    for name, spec in SPECS.items():
        if spec.kind == "port":
            env[name] = str(int(spec.default or 0) + offset)
    return env


def test_status_json_reports_every_component_running_with_its_address(stack: Stack, settings: Settings) -> None:
    result = run_knowton("stack", "status", "--json", env=settings.export_env(include_secrets=False))
    by_name = {c["name"]: c for c in json.loads(result.stdout)}
    assert set(by_name) == {"postgres", "kafka", "connect", "elasticsearch", "sink-elasticsearch", "clickhouse"}
    # The tests run the sinks themselves, so the stack's search sink is stopped here, and status says so.
    assert by_name["sink-elasticsearch"]["state"] == "stopped"
    assert result.returncode == 1, "a component that is not running fails the status"
    servers = run_knowton("stack", "status", *SERVERS, env=settings.export_env(include_secrets=False))
    assert servers.returncode == 0, servers.stdout
    for name in ("postgres", "kafka", "connect", "elasticsearch"):
        assert by_name[name]["state"] == "running", by_name[name]
        assert by_name[name]["pid"], by_name[name]
    assert by_name["postgres"]["address"].endswith(f"127.0.0.1:{settings['KNOWTON_PG_PORT']}/knowton")
    assert by_name["connect"]["address"] == f"http://127.0.0.1:{settings['KNOWTON_CONNECT_PORT']}"
    assert by_name["clickhouse"]["address"].startswith("chdb://")
    assert "password" not in result.stdout.lower()


def test_up_twice_leaves_the_same_single_stack(stack: Stack, settings: Settings) -> None:
    before = {s.name: s.pid for s in stack.status()}
    result = run_knowton("stack", "up", *SERVERS, env=settings.export_env(include_secrets=False))
    assert result.returncode == 0, result.stderr
    after = {s.name: s.pid for s in stack.status()}
    assert before == after
    for name in ("postgres", "kafka", "connect", "elasticsearch"):
        assert f"{name}" in result.stdout


def test_down_stops_what_up_started_and_leaves_no_process(scratch_home: Path) -> None:
    env = scratch_env(scratch_home, offset=20)
    up = run_knowton("stack", "up", "postgres", "kafka", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "stack up in" in up.stdout
    status = json.loads(run_knowton("stack", "status", "--json", env=env).stdout)
    states = {c["name"]: c["state"] for c in status}
    assert states["postgres"] == "running" and states["kafka"] == "running"
    assert states["connect"] == "stopped" and states["elasticsearch"] == "stopped"
    assert processes_mentioning(str(scratch_home))

    down = run_knowton("stack", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert "postgres" in down.stdout and "kafka" in down.stdout
    assert processes_mentioning(str(scratch_home)) == []


def test_up_with_a_taken_port_fails_fast_naming_port_and_setting(scratch_home: Path) -> None:
    env = scratch_env(scratch_home, offset=40)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["KNOWTON_PG_PORT"])))
        holder.listen()
        result = run_knowton("stack", "up", "postgres", env=env, timeout=30)
    assert result.returncode == 2
    assert env["KNOWTON_PG_PORT"] in result.stderr
    assert "KNOWTON_PG_PORT" in result.stderr and "already in use" in result.stderr
    assert processes_mentioning(str(scratch_home)) == []


def test_up_without_java_fails_fast_saying_how_to_install_it(scratch_home: Path) -> None:
    env = scratch_env(scratch_home, offset=60)
    env.update({"JAVA_HOME": "/nonexistent-jdk", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    if Path("/usr/bin/java").exists():
        # /usr/bin/java is the Debian alternative; hide it by pointing PATH at a folder without it.
        bindir = scratch_home / "bin"
        bindir.mkdir()
        env["PATH"] = str(bindir)
    result = run_knowton("stack", "up", "kafka", env=env, timeout=30)
    assert result.returncode == 2
    assert "Java 17 or newer" in result.stderr and "JAVA_HOME" in result.stderr
    assert processes_mentioning(str(scratch_home)) == []


def test_bad_knowton_setting_fails_fast_naming_the_variable(scratch_home: Path) -> None:
    result = run_knowton("stack", "up", env={"KNOWTON_HOME": str(scratch_home), "KNOWTON_ES_PORT": "92OO"}, timeout=30)
    assert result.returncode == 2
    assert "KNOWTON_ES_PORT" in result.stderr and "92OO" in result.stderr
    typo = run_knowton("stack", "up", env={"KNOWTON_HOME": str(scratch_home), "KNOWTON_PG_PROT": "5"}, timeout=30)
    assert typo.returncode == 2
    assert "KNOWTON_PG_PROT" in typo.stderr and "KNOWTON_PG_PORT" in typo.stderr
    assert processes_mentioning(str(scratch_home)) == []


def test_logs_shows_each_components_log(stack: Stack, settings: Settings) -> None:
    result = run_knowton("stack", "logs", "kafka", "-n", "5", env=settings.export_env(include_secrets=False))
    assert result.returncode == 0
    assert str(settings.home / "logs" / "kafka.log") in result.stdout
    assert len(result.stdout.strip().splitlines()) >= 2
