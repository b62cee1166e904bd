"""The `reconcile` job's asset checks against the real stack: drift is a failed check with numbers the UI
plots and the keys in ops.reconcile_diffs; `repair` re-syncs them and the next run passes."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.resources import ElasticsearchResource, build_resources
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline_tests.helpers import ch_row, insert_user, new_address, wait_for_cdc

USERS_MIRROR = dg.AssetKey(["clickhouse", "knowton", "users"])


def _run(job: str, config: dict[str, Any], instance: dg.DagsterInstance, **resources: Any) -> dg.ExecuteInJobResult:
    op = "reconcile_stores" if job == "reconcile" else "repair_differences"
    return (
        defs()
        .resolve_job_def(job)
        .execute_in_process(
            run_config={"ops": {op: {"config": config}}},
            instance=instance,
            resources={**build_resources(), **resources},
            raise_on_error=False,
        )
    )


def _evaluations(result: dg.ExecuteInJobResult) -> list[Any]:
    return [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]


def test_reconcile_job_fails_the_check_with_metadata_and_repair_makes_it_pass(
    caught_up: None, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    extra = new_address()
    ch.command(
        "INSERT INTO knowton.users SELECT * REPLACE ({a:String} AS address) FROM knowton.users AS u FINAL "
        "WHERE u.is_deleted = 0 LIMIT 1",
        parameters={"a": extra},
    )
    config = {"tables": ["User"], "targets": ["clickhouse"], "settle_seconds": 0.5, "error_above_keys": 0}
    with dg.instance_for_test() as instance:
        result = _run("reconcile", config, instance)
        assert result.success
        [evaluation] = _evaluations(result)  # the other checks were left out by the run config
        assert evaluation.asset_key == USERS_MIRROR and evaluation.check_name == "matches_postgres"
        assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.ERROR
        md = evaluation.metadata
        assert md["differing_keys"].value >= 1 and md["extra_in_target"].value >= 1
        assert md["source_rows"].value > 0 and isinstance(md["duration_seconds"].value, float)
        recorded = pg.execute(
            "SELECT kind FROM ops.reconcile_diffs WHERE reconcile_id = %s AND key = %s",
            (md["reconcile_id"].value, extra),
        ).fetchall()
        assert recorded == [("extra",)]
        # Under the threshold the same drift is a WARN.
        warn = _evaluations(_run("reconcile", {**config, "error_above_keys": 1_000_000}, instance))
        assert [(e.passed, e.severity) for e in warn] == [(False, dg.AssetCheckSeverity.WARN)]

        repaired = _run("repair", {"tables": ["User"], "targets": ["clickhouse"]}, instance)
        assert repaired.success
        again = _evaluations(_run("reconcile", config, instance))
        assert [(e.asset_key, e.passed) for e in again] == [(USERS_MIRROR, True)]


def test_reconcile_job_refuses_an_unknown_table_without_a_verdict() -> None:
    with dg.instance_for_test() as instance:
        result = _run("reconcile", {"tables": ["Nope"]}, instance)
        assert not result.success and _evaluations(result) == []
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "unknown table 'Nope'" in str(failure.event_specific_data.error)


def test_a_reconciliation_holding_the_embedded_engine_gives_the_clickhouse_sink_its_turns(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    # A change Debezium has published and no ClickHouse sink has applied yet: while the reconciliation holds the
    # embedded engine, `apply_cdc` cannot run, so only a turn given by the reconciliation can bring it in.
    address = insert_user(pg, reputation=41)
    wait_for_cdc(settings)
    assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is None
    config = {"tables": ["User"], "targets": ["clickhouse"], "settle_seconds": 1.0, "sink_turn_seconds": 0.0}
    with dg.instance_for_test() as instance:
        result = _run("reconcile", config, instance)
        assert result.success
        [evaluation] = _evaluations(result)
        # The row was missing when the reconciliation started; the sink's turn applied it before the re-check.
        assert evaluation.passed, evaluation.description
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        assert any("the ClickHouse sink took its turn" in m for m in logs), logs
    row = ch_row(ch, "users", "address = {a:String}", {"a": address})
    assert row is not None and row["reputation"] == 41


def test_a_store_down_mid_run_fails_the_run_naming_the_pair_and_gives_no_verdict(caught_up: None) -> None:
    # Nothing listens on this port: the search store is down for this run.
    down = ElasticsearchResource(url="http://127.0.0.1:9", request_timeout=2.0)
    config = {"tables": ["User"], "targets": ["elasticsearch"], "settle_seconds": 0}
    with dg.instance_for_test() as instance:
        result = _run("reconcile", config, instance, elasticsearch=down)
        assert not result.success and _evaluations(result) == []
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        error = str(failure.event_specific_data.error)
        assert "1 reconciliation(s) could not finish" in error and "User -> elasticsearch" in error, error
