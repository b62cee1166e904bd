"""ClickHouse clients: the embedded engine (chDB, `chdb://PATH`) or a server (`http(s)://`), same code.

An embedded engine's folder can be open in one process at a time. A lock file beside the folder
records who holds it, so a second opener gets a clear error instead of chDB's bare
"Error initializing EmbeddedServer".
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from knowton_pipeline.lib.settings import redact_dsn as redact


class ClickHouseLockedError(RuntimeError):
    """The embedded engine's folder is already open in another process."""


def embedded_path(dsn: str) -> Path:
    """The data folder of a `chdb://` DSN."""
    rest = dsn[len("chdb://") :]
    return Path(rest if rest.startswith("/") else "/" + rest)


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def lock_holder(path: Path) -> int | None:
    """The pid holding the embedded engine at `path`, or None when nobody does."""
    lock = _lock_file(path)
    if not lock.exists():
        return None
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


# One embedded client per path per process: chDB allows a single engine per process anyway.
_embedded: dict[Path, tuple[Client, object]] = {}
_guard = threading.Lock()


def _open_embedded(path: Path) -> Client:
    with _guard:
        if path in _embedded:
            return _embedded[path][0]
        if _embedded:
            other = next(iter(_embedded))
            raise ClickHouseLockedError(
                f"this process already has the embedded ClickHouse engine open at {other}; chDB allows one "
                f"engine folder per process, so {path} cannot be opened here as well"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(_lock_file(path), "a+")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ClickHouseLockedError(
                f"the embedded ClickHouse engine at {path} is already open in process {holder}; "
                "it can be open in one process at a time: stop that process, wait for its run to finish, "
                "or point KNOWTON_CLICKHOUSE_DSN at a ClickHouse server (http://...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        _embedded[path] = (client, handle)
        return client


def get_client(dsn: str) -> Client:
    """A client for `dsn`; embedded clients are shared within the process and locked across processes."""
    if dsn.startswith("chdb://"):
        return _open_embedded(embedded_path(dsn))
    if re.match(r"^https?://", dsn):
        return clickhouse_connect.get_client(dsn=dsn)
    raise ValueError(f"unsupported ClickHouse DSN {redact(dsn)!r}: use chdb:///path or http(s)://host:port")


@contextmanager
def connection(dsn: str) -> Iterator[Client]:
    client = get_client(dsn)
    try:
        yield client
    finally:
        if not dsn.startswith("chdb://"):
            client.close()


def run_script(client: Client, sql_text: str) -> int:
    """Execute a file of statements separated by `;` at line end; returns how many ran."""
    statements = [s.strip() for s in re.split(r";\s*\n", sql_text + "\n") if _has_code(s)]
    for s in statements:
        client.command(s)
    return len(statements)


def _has_code(stmt: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in stmt.splitlines())
