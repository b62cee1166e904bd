"""The `knowton` command line without a stack: help, choices, and usage errors that exit 2 naming what is wrong."""

from __future__ import annotations

import pytest

from knowton_pipeline.cli import main


def test_help_lists_every_command_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("stack", "schema", "connectors", "seed", "sink", "reconcile", "env"):
        assert f"  {command} " in out


def test_reconcile_help_offers_the_tables_targets_and_modes_as_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reconcile", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[all|User|Content|Purchase|user_activity|content_sales_daily]" in out
    assert "[all|clickhouse|elasticsearch]" in out and "[incremental|checksum|full]" in out
    assert "exit 0 clean" in out.lower() or "Exit code 0: clean" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reconcile", "--table", "Nope"], "unknown table 'Nope'; tables are: all, User"),
        (["reconcile", "--target", "mongodb"], "unknown target 'mongodb'; targets are: all, clickhouse, elasticsearch"),
        (["reconcile", "--mode", "sideways"], "unknown mode 'sideways'; modes are: incremental, checksum, full"),
        (["reconcile", "--full", "--incremental"], "choose one mode, not full and incremental"),
        (["reconcile", "--threshold", "0"], "--threshold"),
        (["reconcile", "--output", "diffs.xlsx"], "unknown suffix '.xlsx'; use one of .csv, .parquet"),
        (["stack", "logs", "nope"], "unknown component 'nope'; components are: postgres, kafka, connect"),
        (["stack", "sideways"], "No such command 'sideways'"),
        (["schema", "apply", "mongodb"], "unknown store 'mongodb'"),
        (["seed", "--users", "many"], "'many' is not a valid integer"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_a_usage_error_exits_2_naming_what_is_wrong(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Usage: knowton" in err


def test_a_bad_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KNOWTON_ES_PORT", "92OO")
    assert main(["env"]) == 2
    assert "KNOWTON_ES_PORT" in capsys.readouterr().err


def test_env_prints_export_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("export ") for line in lines)
    assert any(line.startswith("export DAGSTER_HOME=") for line in lines)
