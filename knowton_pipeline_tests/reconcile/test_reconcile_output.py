"""`knowton reconcile --output` against the real stack: every differing key lands in the CSV or Parquet file with
its kind and columns, a repair marks what it verified, and an unknown suffix is refused before any store is read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.cli import main
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import insert_user, new_address

ARGS = ["reconcile", "--table", "User", "--target", "clickhouse", "--threshold", "32", "--settle", "0.5"]


def _runs(pg: psycopg.Connection) -> int:
    return pg.execute("SELECT count(*) FROM ops.reconcile_runs").fetchone()[0]  # type: ignore[index]


def test_knowton_reconcile_output_lists_every_differing_key_and_what_the_repair_verified(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edited, extra = insert_user(pg, reputation=5), new_address()
    apply()
    for replace in (f"'{extra}' AS address", "reputation + 100 AS reputation, version + 1 AS version"):
        ch.command(
            f"INSERT INTO knowton.users SELECT * REPLACE ({replace}) FROM knowton.users AS u FINAL "
            "WHERE u.address = {a:String}",
            parameters={"a": edited},
        )

    assert main([*ARGS, "--json", "--output", str(tmp_path / "diffs.csv")]) == 1
    [report] = json.loads(capsys.readouterr().out)
    diffs = pd.read_csv(tmp_path / "diffs.csv", dtype=str, keep_default_na=False).set_index("key")
    assert diffs.loc[extra, ["table", "target", "kind", "differing_columns"]].tolist() == [
        "User",
        "clickhouse",
        "extra_in_target",
        "",
    ]
    assert diffs.loc[edited, ["kind", "differing_columns"]].tolist() == ["different", "reputation"]
    assert len(diffs) == report["missing_in_target"] + report["extra_in_target"] + report["different"]
    assert set(diffs["reconcile_id"]) == {str(report["reconcile_id"])}
    assert set(diffs["verified_after_repair"]) == {""}  # no repair in this run

    # With --repair, the file says which keys the repair verified.
    assert main([*ARGS, "--repair", "--output", str(tmp_path / "diffs.parquet")]) == 0
    assert f"written to {tmp_path / 'diffs.parquet'}" in capsys.readouterr().out
    repaired = pd.read_parquet(tmp_path / "diffs.parquet").set_index("key")
    assert repaired.loc[[extra, edited], "kind"].tolist() == ["extra_in_target", "different"]
    assert repaired["verified_after_repair"].all()

    # Clean now: the file holds the header only.
    assert main([*ARGS, "--output", str(tmp_path / "clean.csv")]) == 0
    assert pd.read_csv(tmp_path / "clean.csv").empty


def test_knowton_reconcile_refuses_an_output_it_cannot_write_before_reading_any_store(
    pg: psycopg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _runs(pg)
    assert main([*ARGS, "--output", str(tmp_path / "diffs.xlsx")]) == 2
    err = capsys.readouterr().err
    assert "unknown suffix '.xlsx'" in err and "use one of .csv, .parquet" in err
    assert main([*ARGS, "--output", str(tmp_path / "missing" / "diffs.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _runs(pg) == runs and list(tmp_path.iterdir()) == []
