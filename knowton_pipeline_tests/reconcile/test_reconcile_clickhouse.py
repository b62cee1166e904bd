"""Drift injected into a ClickHouse mirror behind the pipeline's back is reported exactly: the keys,
and for changed rows the columns, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.reconcile.clickhouse_target import ClickHouseReconciler, ReconcileResult
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.sync.conftest import insert_user, new_address


def reconcile(settings: Settings, ch: ClickHouseClient, name: str, threshold: int = 16) -> ReconcileResult:
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        return ClickHouseReconciler(conn, ch, table(name), threshold=threshold, fanout=8).run()


def test_rows_deleted_edited_and_added_in_the_mirror_are_reported_exactly(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
) -> None:
    users = [insert_user(pg, reputation=i) for i in range(40)]
    apply()
    before = reconcile(settings, ch, "User")
    deleted, edited = users[3], users[17]
    extra = new_address()
    ch.command(
        "ALTER TABLE knowton.users DELETE WHERE address = {a:String} SETTINGS mutations_sync = 1",
        parameters={"a": deleted},
    )
    ch.command(
        "INSERT INTO knowton.users SELECT * REPLACE (reputation + 100 AS reputation, version + 1 AS version) "
        "FROM knowton.users FINAL WHERE address = {a:String}",
        parameters={"a": edited},
    )
    [template] = list(
        ch.query(
            "SELECT * FROM knowton.users FINAL WHERE address = {a:String}", parameters={"a": users[0]}
        ).named_results()
    )
    ch.insert("knowton.users", [list({**template, "address": extra}.values())], column_names=list(template))
    after = reconcile(settings, ch, "User")
    d0, d1 = before.differences, after.differences
    assert sorted(set(d1.missing_in_target) - set(d0.missing_in_target)) == [deleted]
    assert sorted(set(d1.extra_in_target) - set(d0.extra_in_target)) == [extra]
    new_different = {k: v for k, v in d1.different.items() if k not in d0.different}
    assert new_different == {edited: ["reputation"]}
    assert after.target_rows == before.target_rows  # one row fewer, one more
    assert after.source_rows == before.source_rows
    # Only mismatching segments travel: far fewer rows than the table.
    assert after.stats.rows_compared < max(200, after.source_rows)


def test_knowton_reconcile_exit_codes_and_json_follow_the_verdict(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, capsys
) -> None:  # type: ignore[no-untyped-def]
    import json

    from knowton_pipeline.cli import main

    extra = new_address()
    [template] = list(ch.query("SELECT * FROM knowton.users FINAL LIMIT 1").named_results())
    ch.insert("knowton.users", [list({**template, "address": extra}.values())], column_names=list(template))
    code = main(["reconcile", "--table", "User", "--json", "--threshold", "32"])
    [report] = json.loads(capsys.readouterr().out)
    assert code == 1 and report["clean"] is False
    assert report["table"] == "User" and report["target"] == "clickhouse"
    assert report["extra_in_target"] >= 1 and report["source_rows"] > 0
    assert main(["reconcile", "--table", "Nope"]) == 2
    assert "unknown table 'Nope'" in capsys.readouterr().err
    assert main(["reconcile", "--target", "elasticsearch"]) == 2
