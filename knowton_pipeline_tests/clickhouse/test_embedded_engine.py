"""The embedded ClickHouse engine (chDB) accepts the DDL, and a second process gets a clear lock error."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sql import read_sql

OPEN_SNIPPET = """
import sys
from knowton_pipeline.lib import clickhouse
try:
    clickhouse.get_client(sys.argv[1]).command("SELECT 1")
except clickhouse.ClickHouseLockedError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def ch_dsn(settings: Settings) -> str:
    # chDB opens one engine folder per process: the tests use the stack's, as the pipeline does.
    return settings.clickhouse_dsn


def test_clickhouse_ddl_applies_twice_and_mirrors_keep_the_newest_version(ch_dsn: str) -> None:
    client = clickhouse.get_client(ch_dsn)
    db = f"ddl_test_{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        for name in ("mirrors.sql", "aggregates.sql"):
            clickhouse.run_script(client, read_sql("clickhouse", name).replace("knowton", db))
    tables = {r[0] for r in client.query(f"SELECT name FROM system.tables WHERE database = '{db}'").result_rows}
    assert {"users", "contents", "purchases", "cdc_heartbeat", "user_activity", "content_sales_daily"} <= tables
    ts = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    cols = [
        "id",
        "creator",
        "title",
        "description",
        "category",
        "tags",
        "price",
        "status",
        "metadata",
        "created_at",
        "updated_at",
        "version",
        "is_deleted",
    ]
    client.insert(
        f"{db}.contents",
        [
            [1, "0xa", "old", None, "art", [], Decimal("5.00"), "draft", "{}", ts, ts, 10, 0],
            [1, "0xa", "new", None, "art", ["x"], Decimal("5.10"), "published", "{}", ts, ts, 20, 0],
            [1, "0xa", "stale", None, "art", [], Decimal("1.00"), "draft", "{}", ts, ts, 15, 0],
            [2, "0xb", "gone", None, "art", [], Decimal("0.00"), "draft", "{}", ts, ts, 30, 1],
        ],
        column_names=cols,
    )
    rows = client.query(f"SELECT id, title, price FROM {db}.contents FINAL ORDER BY id").result_rows
    client.command(f"DROP DATABASE {db}")
    assert rows == [(1, "new", Decimal("5.10"))]


def test_second_process_opening_the_engine_gets_a_clear_error_naming_the_holder(ch_dsn: str) -> None:
    clickhouse.get_client(ch_dsn)  # this test process holds it
    result = subprocess.run(
        [sys.executable, "-c", OPEN_SNIPPET, ch_dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert f"already open in process {os.getpid()}" in result.stdout
    assert "one process at a time" in result.stdout
    assert "EmbeddedServer" not in result.stdout + result.stderr


def test_engine_is_free_again_once_the_holder_exits(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'data'}"
    first = subprocess.run([sys.executable, "-c", OPEN_SNIPPET, dsn], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr
    assert clickhouse.lock_holder(clickhouse.embedded_path(dsn)) is None
    second = subprocess.run([sys.executable, "-c", OPEN_SNIPPET, dsn], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr


def test_opening_a_second_engine_folder_in_one_process_is_a_clear_error(ch_dsn: str, tmp_path: Path) -> None:
    clickhouse.get_client(ch_dsn)
    with pytest.raises(clickhouse.ClickHouseLockedError, match="one engine folder per process"):
        clickhouse.get_client(f"chdb://{tmp_path / 'other'}")


def test_unsupported_dsn_is_refused_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported ClickHouse DSN") as err:
        clickhouse.get_client("tcp://user:s3cret@host:9000")
    assert "s3cret" not in str(err.value)
