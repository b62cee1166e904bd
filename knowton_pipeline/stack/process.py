"""Start, find and stop the stack's background processes, each tracked by a small JSON pid record."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    marker: str  # a path every command line of ours contains, so a recycled pid is never mistaken for ours
    log: str
    started_at: float

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__))


def pid_alive(pid: int, marker: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if given, its command line or cwd mentions `marker`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        return False
    if marker is None:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        # A launcher script shows the marker only once it execs the server; its working folder, set
        # by spawn(), shows it from the start.
        cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
    except OSError:
        return False
    return marker in cmdline or cwd.startswith(marker)


def user_ids(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    record_path: Path,
    marker: str,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None = None,
) -> ProcessRecord:
    """Start `argv` in its own session (so stopping it stops its children), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ids = user_ids(user)
    with open(log, "ab") as out:
        out.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        if ids is not None:
            os.chown(log, *ids)
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )
    record = ProcessRecord(name=name, pid=proc.pid, marker=marker, log=str(log), started_at=time.time())
    record.save(record_path)
    return record


def stop(record: ProcessRecord, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Signal the process group, wait, then kill what is left. True if something was stopped."""
    if not pid_alive(record.pid, record.marker):
        return False
    try:
        os.killpg(record.pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not pid_alive(record.pid) and not _group_alive(record.pid):
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGKILL)
    for _ in range(50):
        _reap(record.pid)
        if not _group_alive(record.pid):
            break
        time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    # When this process is the parent (tests start and stop stacks in-process) the child must be reaped.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[3]) == pgid:
            return True
    return False
