"""Scheduled reconciliations repair what they find up to a cap and only alert above it; every repair is recorded
with its reason, and the time from finding drift to the check passing again is reported for the UI to plot."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.reconcile.checks import AUTO_REPAIR_KEYS
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline_tests.helpers import new_address

USERS_MIRROR = dg.AssetKey(["clickhouse", "knowton", "users"])


def _reconcile(config: dict[str, Any], instance: dg.DagsterInstance) -> Any:
    result = (
        defs()
        .resolve_job_def("reconcile")
        .execute_in_process(
            run_config={"ops": {"reconcile_stores": {"config": config}}},
            instance=instance,
            resources=build_resources(),
            raise_on_error=False,
        )
    )
    assert result.success
    [evaluation] = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return evaluation


def _extra_mirror_row(ch: ClickHouseClient) -> str:
    extra = new_address()
    ch.command(
        "INSERT INTO knowton.users SELECT * REPLACE ({a:String} AS address) FROM knowton.users AS u FINAL "
        "WHERE u.is_deleted = 0 LIMIT 1",
        parameters={"a": extra},
    )
    return extra


def test_the_schedules_repair_up_to_the_cap_and_record_why() -> None:
    d = defs()
    for name in ("reconcile_hourly", "reconcile_daily"):
        [request] = d.resolve_schedule_def(name).evaluate_tick(dg.build_schedule_context()).run_requests or []
        config = request.run_config["ops"]["reconcile_stores"]["config"]
        assert config["repair"] is True and config["max_repair_keys"] == AUTO_REPAIR_KEYS
        assert config["error_above_keys"] == AUTO_REPAIR_KEYS
        assert name in config["repair_reason"]


def test_drift_within_the_cap_is_repaired_recorded_with_its_reason_and_its_time_to_heal_reported(
    caught_up: None, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    extra = _extra_mirror_row(ch)
    config = {
        "tables": ["User"],
        "targets": ["clickhouse"],
        "settle_seconds": 0.5,
        "repair": True,
        "max_repair_keys": 10,
        "repair_reason": "auto-repair test",
    }
    with dg.instance_for_test() as instance:
        evaluation = _reconcile(config, instance)
    assert evaluation.asset_key == USERS_MIRROR
    assert evaluation.passed is True, "repaired and verified: the stores match as the run leaves them"
    md = evaluation.metadata
    assert md["differing_keys"].value >= 1 and md["repaired_keys"].value >= 1
    assert md["still_different_after_repair"].value == 0
    assert md["repair_reason"].value == "auto-repair test"
    assert md["time_to_heal_seconds"].value >= 0
    row = pg.execute(
        "SELECT kind, verified, repair_reason FROM ops.reconcile_diffs WHERE reconcile_id = %s AND key = %s",
        (md["reconcile_id"].value, extra),
    ).fetchone()
    assert row == ("extra", True, "auto-repair test")
    count = ch.query("SELECT count() FROM knowton.users FINAL WHERE address = {a:String}", parameters={"a": extra})
    assert count.result_rows[0][0] == 0


def test_drift_above_the_cap_is_not_repaired_but_alerted_and_healing_later_reports_how_long_it_took(
    caught_up: None, pg: psycopg.Connection, ch: ClickHouseClient
) -> None:
    _extra_mirror_row(ch)
    config = {"tables": ["User"], "targets": ["clickhouse"], "settle_seconds": 0.5, "repair": True}
    with dg.instance_for_test() as instance:
        refused = _reconcile({**config, "max_repair_keys": 0}, instance)
        assert refused.passed is False and refused.severity == dg.AssetCheckSeverity.ERROR
        assert "skipped" in refused.metadata["repair"].value and "time_to_heal_seconds" not in refused.metadata
        unrepaired = pg.execute(
            "SELECT count(*) FROM ops.reconcile_diffs WHERE reconcile_id = %s AND repaired_at IS NOT NULL",
            (refused.metadata["reconcile_id"].value,),
        ).fetchone()
        assert unrepaired == (0,)
        healed = _reconcile({**config, "max_repair_keys": 1000}, instance)
    assert healed.passed is True
    # The incident opened by the first run is the one this run closed: its age covers both runs.
    assert healed.metadata["time_to_heal_seconds"].value >= refused.metadata["duration_seconds"].value
