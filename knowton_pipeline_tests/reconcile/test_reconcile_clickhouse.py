"""Drift injected into a ClickHouse mirror behind the pipeline's back is reported exactly: the keys,
and for changed rows the columns, nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.cli import main
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import Reconcile, insert_user, new_address, new_keys, wait_for_cdc


def _copy_with(ch: ClickHouseClient, address: str, replace: str) -> None:
    """Write a copy of a mirror row with some columns replaced (aliases shadow columns in ClickHouse's
    WHERE, so the source row is named through the table alias)."""
    ch.command(
        f"INSERT INTO knowton.users SELECT * REPLACE ({replace}) FROM knowton.users AS u FINAL "
        "WHERE u.address = {a:String}",
        parameters={"a": address},
    )


def test_rows_deleted_edited_and_added_in_the_mirror_are_reported_exactly(
    caught_up: None, apply: Callable[[], ApplyStats], pg: psycopg.Connection, ch: ClickHouseClient, reconcile: Reconcile
) -> None:
    users = [insert_user(pg, reputation=i) for i in range(40)]
    apply()
    before = reconcile("User")
    deleted, edited, extra = users[3], users[17], new_address()
    ch.command(
        "ALTER TABLE knowton.users DELETE WHERE address = {a:String} SETTINGS mutations_sync = 1",
        parameters={"a": deleted},
    )
    _copy_with(ch, edited, "reputation + 100 AS reputation, version + 1 AS version")
    _copy_with(ch, users[0], f"'{extra}' AS address")
    after = reconcile("User")
    assert new_keys(after, before) == {"missing": [deleted], "extra": [extra], "different": {edited: ["reputation"]}}
    assert (after.source_rows, after.target_rows) == (before.source_rows, before.target_rows)
    # Only mismatching segments travel: far fewer rows than the table.
    assert after.stats.rows_compared < max(400, after.source_rows // 4)
    assert after.first_pass == after.differences.total and after.in_flight == []


def test_a_change_made_while_the_apply_is_paused_is_reported_until_it_is_applied(
    caught_up: None, apply: Callable[[], ApplyStats], pg: psycopg.Connection, settings, reconcile: Reconcile
) -> None:  # type: ignore[no-untyped-def]
    before = reconcile("User")
    # The first row in key order that no earlier test left drifted on purpose.
    drifted = [*before.differences.different, *before.differences.missing_in_target]
    [old] = pg.execute(  # type: ignore[misc]
        'SELECT address FROM "User" WHERE address <> ALL(%s) ORDER BY address LIMIT 1', (drifted,)
    ).fetchone()
    fresh = insert_user(pg)
    pg.execute('UPDATE "User" SET bio = %s, "updatedAt" = now() WHERE address = %s', (f"paused {fresh}", old))
    wait_for_cdc(settings)  # in Kafka, not applied: the apply is paused
    for mode in ("checksum", "incremental"):
        paused = reconcile("User", mode=mode)
        found = new_keys(paused, before)
        assert found["missing"] == [fresh], mode
        assert found["different"] == {old: ["bio", "updatedAt"]}, mode
    apply()
    assert new_keys(reconcile("User"), before) == {"missing": [], "extra": [], "different": {}}


def test_incremental_mode_checks_only_the_window(
    caught_up: None, apply: Callable[[], ApplyStats], pg: psycopg.Connection, ch: ClickHouseClient, reconcile: Reconcile
) -> None:
    # A row last changed two days ago, then edited in the mirror: only a full pass can see it.
    old = insert_user(pg, **{"createdAt": "2025-06-01T00:00:00Z", "updatedAt": "2025-06-02T00:00:00Z"})
    apply()
    before = reconcile("User")
    _copy_with(ch, old, "concat(username, '!') AS username, version + 1 AS version")
    assert reconcile("User").differences.different.get(old) == ["username"]
    incremental = reconcile("User", mode="incremental")
    assert old not in incremental.differences.different
    assert incremental.source_rows < before.source_rows  # it looked at the window, not the table


def test_store_down_mid_run_gives_an_error_and_no_verdict(settings, ch: ClickHouseClient) -> None:  # type: ignore[no-untyped-def]
    from knowton_pipeline.catalog import table
    from knowton_pipeline.lib.reconcile.engine import ReconcileError, ReconcileOptions, build_reconciler

    [some] = ch.query("SELECT address FROM knowton.users FINAL WHERE is_deleted = 0 LIMIT 1").result_rows[0]
    _copy_with(ch, some, f"'{new_address()}' AS address")  # drift, so the run must go back to PostgreSQL
    with (
        psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn,  # type: ignore[arg-type]
        psycopg.connect(**settings.pg_conninfo(), autocommit=True) as killer,  # type: ignore[arg-type]
    ):
        pid = conn.info.backend_pid

        def kill_source(_message: str) -> None:  # PostgreSQL drops the reconciler's session after the first step
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))

        reconciler = build_reconciler(
            table("User"),
            "clickhouse",
            conn=conn,
            client=ch,
            options=ReconcileOptions(threshold=8),
            on_progress=kill_source,
        )
        with pytest.raises(ReconcileError, match=r"User with clickhouse stopped after .* no verdict"):
            reconciler.run()


def test_knowton_reconcile_exit_codes_json_diff_table_and_repair(
    caught_up: None, pg: psycopg.Connection, ch: ClickHouseClient, capsys
) -> None:  # type: ignore[no-untyped-def]
    extra = new_address()
    [some] = pg.execute('SELECT address FROM "User" ORDER BY address DESC LIMIT 1').fetchone()  # type: ignore[misc]
    _copy_with(ch, some, f"'{extra}' AS address")
    args = ["reconcile", "--table", "User", "--target", "clickhouse", "--json", "--threshold", "32", "--settle", "0.5"]
    code = main(args)
    [report] = json.loads(capsys.readouterr().out)
    assert code == 1 and report["clean"] is False
    assert (report["table"], report["target"], report["mode"]) == ("User", "clickhouse", "checksum")
    assert extra in report["sample_extra"] or report["extra_in_target"] > 20
    recorded = pg.execute(
        "SELECT kind FROM ops.reconcile_diffs WHERE reconcile_id = %s AND key = %s", (report["reconcile_id"], extra)
    ).fetchall()
    assert recorded == [("extra",)]
    # --repair: re-sync every differing key, re-verify, mark them; the exit code says what is left.
    assert main([*args, "--repair"]) == 0
    [repaired] = json.loads(capsys.readouterr().out)
    assert repaired["repair"]["verified"] is True and repaired["repair"]["tombstones"] >= 1
    assert pg.execute(
        "SELECT verified FROM ops.reconcile_diffs WHERE reconcile_id = %s AND key = %s",
        (repaired["reconcile_id"], extra),
    ).fetchall() == [(True,)]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)[0]["clean"] is True
    # Bad input: a clear error, exit 2.
    assert main(["reconcile", "--table", "Nope"]) == 2
    assert "unknown table 'Nope'" in capsys.readouterr().err
    assert main(["reconcile", "--target", "mongodb"]) == 2
    assert "unknown target 'mongodb'" in capsys.readouterr().err
    assert main(["reconcile", "--table", "Purchase", "--target", "elasticsearch"]) == 2
    assert "Purchase is not synced to elasticsearch" in capsys.readouterr().err


def test_knowton_reconcile_gives_the_embedded_clickhouse_sink_its_turns_while_it_waits(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, capsys
) -> None:  # type: ignore[no-untyped-def]
    # A new row is in Kafka and nothing has applied it: the command holds the embedded engine, so only it can let
    # the ClickHouse sink apply it. Without turns, the re-check would wait for a sink that never moves.
    address = insert_user(pg, reputation=3)
    wait_for_cdc(settings)
    held = "SELECT count() FROM knowton.users FINAL WHERE address = {a:String}"
    assert ch.query(held, parameters={"a": address}).result_rows == [(0,)]

    code = main(["reconcile", "--table", "User", "--target", "clickhouse", "--json", "--stuck", "30", "--no-record"])

    [report] = json.loads(capsys.readouterr().out)
    assert code == 0 and report["clean"] is True, report
    assert report["confirmed_by"] == "position" and report["lagging"] == 0
    assert ch.query(held, parameters={"a": address}).result_rows == [(1,)]
