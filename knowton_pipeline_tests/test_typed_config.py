"""Run config is typed end to end: modes are choices the launchpad offers, schedules and sensors build valid run
config from Config objects, and sensor cursors are typed models that start over from an unreadable cursor."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.alerts.sensors import CheckAlertCursor
from knowton_pipeline.defs.cursors import AlertCursor, RunCounterCursor, SensorCursor
from knowton_pipeline.defs.kafka_connect.health import (
    ConnectorHealthCursor,
    ConnectorHealthPolicy,
    evaluate,
    restart_failed_connectors,
)
from knowton_pipeline.lib.health.connect import ConnectHealth, ConnectorHealth, TaskState


def _choices(job: str, op: str, field: str) -> list[str]:
    ops = defs().resolve_job_def(job).run_config_schema.config_type.fields["ops"].config_type  # type: ignore[attr-defined]
    config = ops.fields[op].config_type.fields["config"].config_type
    return [v.config_value for v in config.fields[field].config_type.enum_values]


def test_the_launchpad_offers_the_reconcile_modes_and_the_indexed_tables_as_choices() -> None:
    assert _choices("reconcile", "reconcile_stores", "mode") == ["incremental", "checksum", "full"]
    assert _choices("rebuild_search_index", "rebuild_search_index_op", "table") == ["User", "Content"]


def test_a_mode_that_does_not_exist_is_refused_before_the_run_starts() -> None:
    job = defs().resolve_job_def("reconcile")
    with pytest.raises(dg.DagsterInvalidConfigError, match="sideways"):
        dg.validate_run_config(job, {"ops": {"reconcile_stores": {"config": {"mode": "sideways"}}}})


def test_every_schedule_builds_run_config_its_job_accepts() -> None:
    d = defs()
    modes = {}
    for schedule in d.schedules or []:
        [request] = schedule.evaluate_tick(dg.build_schedule_context()).run_requests or []
        dg.validate_run_config(d.resolve_job_def(schedule.job_name), request.run_config)
        modes[schedule.name] = (
            request.run_config.get("ops", {}).get("reconcile_stores", {}).get("config", {}).get("mode")
        )
    assert modes["reconcile_hourly"] == "incremental" and modes["reconcile_daily"] == "full"


def test_a_restart_request_carries_typed_run_config_the_restart_job_accepts() -> None:
    failed = ConnectorHealth("scratch", "RUNNING", [TaskState(0, "FAILED", None, "java.lang.IllegalStateException")])
    runs, _, _ = evaluate(
        ConnectHealth(True, None, {"scratch": failed}), ConnectorHealthCursor(), ConnectorHealthPolicy(), 0.0, 600
    )
    [request] = runs
    assert request.run_config["ops"]["restart_connectors"]["config"]["connectors"] == ["scratch"]
    dg.validate_run_config(restart_failed_connectors, request.run_config)


def test_a_connector_health_cursor_of_the_earlier_shape_is_read_as_is() -> None:
    earlier = {
        "alerts": {},
        "unreachable_ticks": 1,
        "connectors": {
            "scratch": {
                "attempts": 2,
                "next_at": 30.0,
                "last_trace": "java.lang.IllegalStateException",
                "observed": [["RUNNING", ["FAILED"], 2], 10.0],
                "config_digest": "a",
            }
        },
    }
    cursor = ConnectorHealthCursor.load(dg.build_sensor_context(cursor=json.dumps(earlier)))
    entry = cursor.connectors["scratch"]
    assert (cursor.unreachable_ticks, entry.attempts, entry.next_at, entry.config_digest) == (1, 2, 30.0, "a")
    assert entry.observed == (("RUNNING", ("FAILED",), 2), 10.0)
    again = json.loads(cursor.dump())
    assert again["connectors"]["scratch"]["attempts"] == 2 and again["unreachable_ticks"] == 1


@pytest.mark.parametrize("model", [ConnectorHealthCursor, CheckAlertCursor, AlertCursor, RunCounterCursor])
@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"connectors": 5, "seen": "x", "requested": "many"}'])
def test_a_cursor_that_does_not_parse_starts_over_from_the_defaults(model: type[SensorCursor], raw: str) -> None:
    assert model.load(dg.build_sensor_context(cursor=raw)) == model()


def test_the_run_counter_carries_over_the_earlier_bare_count_so_run_keys_never_repeat() -> None:
    assert RunCounterCursor.load(dg.build_sensor_context(cursor="7")).requested == 7
    assert RunCounterCursor.load(dg.build_sensor_context(cursor='{"requested": 9}')).requested == 9
    assert RunCounterCursor.load(dg.build_sensor_context(cursor=None)).requested == 0
