"""Alerts for what fails without failing a run: asset checks (a failed check does not fail its run, so a
run-failure sensor never sees it), and for failed runs. Both go to the configured channels: the log, and
the webhook of KNOWTON_ALERT_WEBHOOK_URL."""

import time
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from pydantic import Field

from knowton_pipeline.defs.cursors import AlertCursor
from knowton_pipeline.defs.kafka_connect.health import restart_failed_connectors
from knowton_pipeline.defs.resources import AlertsResource
from knowton_pipeline.lib.health.alerts import Alert, AlertBook, Dispatch, deliver

DONE = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
PLOTTED = ("differing_keys", "lag_seconds", "retained_wal_bytes", "source_rows", "target_rows")


class CheckAlertCursor(AlertCursor):
    """The cursor of `check_failure_alert_sensor`: per check, the id of the last evaluation it saw."""

    seen: dict[str, int] = Field(default_factory=dict)


def _evaluation(record: Any) -> Any:
    event = record.event
    return event.dagster_event.event_specific_data if event is not None and event.dagster_event else None


def _fields(evaluation: Any, run_id: str) -> dict[str, str]:
    fields = {"run": run_id}
    metadata = getattr(evaluation, "metadata", {}) or {}
    for name in PLOTTED:
        if name in metadata:
            fields[name] = str(metadata[name].value)
    return fields


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Alerts once when an asset check fails (throttled per check: held back within the window, sent when it "
        "ends if the check still fails), and once when it passes again; undelivered messages are retried. "
        "Its cursor holds the last evaluation seen per check and the alert state."
    ),
)
def check_failure_alert_sensor(context: dg.SensorEvaluationContext, alerts: AlertsResource) -> dg.SensorResult:
    state = CheckAlertCursor.load(context)
    seen = state.seen
    book = AlertBook.from_json(state.alerts)
    keys = sorted(context.repository_def.asset_graph.asset_check_keys, key=lambda k: k.to_user_string())  # type: ignore[union-attr]
    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    dispatch = Dispatch(alerts.channels(context.log), context.log)
    now, new, sent, undelivered = time.time(), 0, 0, 0
    for key in keys:
        record = latest.get(key)
        name = key.to_user_string()
        if record is None or record.status not in DONE:
            continue
        if record.id > seen.get(name, 0):
            seen[name], new = record.id, new + 1
        # The latest evaluation is fed on every tick, not only when it is new: an alert held back by the
        # throttle, or one whose delivery failed, goes out on a later tick if the check still fails.
        evaluation = _evaluation(record)
        failing = record.status == AssetCheckExecutionRecordStatus.FAILED
        error = getattr(evaluation, "severity", None) == dg.AssetCheckSeverity.ERROR
        title = f"Check {key.name} on {key.asset_key.to_user_string()}"
        alert = book.update(
            Alert(
                f"check:{name}",
                "error" if error else "warning",
                f"{title} failed",
                getattr(evaluation, "description", None) or "no description",
                _fields(evaluation, record.run_id),
            ),
            failing,
            now,
            alerts.throttle_seconds,
            recovery=Alert(f"check:{name}", "recovery", f"Recovered: {title}", "The check passes again."),
        )
        if alert is None:
            continue
        if dispatch.send(alert):
            book.mark_sent(alert, now)
            sent += 1
        else:
            undelivered += 1
    state.alerts = book.to_json()
    return dg.SensorResult(
        cursor=state.dump(),
        skip_reason=(
            f"{new} new evaluation(s), {sent} message(s) sent"
            + (f", {undelivered} not delivered (tried again next tick)" if undelivered else "")
        ),
    )


def _step_failure(event: dg.DagsterEvent) -> str:
    """Why a step failed: a raised dg.Failure's own description, else the exception the op raised (Dagster
    wraps it in an error that only names the op)."""
    data = event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    error = data.error
    if error is None:
        return "no error recorded"
    if error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    return error.message.strip()


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Alerts on every failed run of this code location, with the failing step's message; failed connector "
        "restarts are left to connector_health_sensor, which alerts once its restarts run out."
    ),
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
    run = context.dagster_run
    if run.job_name == restart_failed_connectors.name:
        context.log.info(f"run {run.run_id} of {run.job_name} failed; connector_health_sensor retries and alerts")
        return
    steps = [f"{e.step_key}: {_step_failure(e)}" for e in context.get_step_failure_events()]
    message = "\n".join(steps) or context.failure_event.message or "no message"
    alert = Alert(
        f"run:{run.job_name}",
        "error",
        f"Run of {run.job_name} failed",
        message[:1500],
        {"run": run.run_id, "job": run.job_name},
    )
    deliver(alerts.channels(context.log), alert, context.log)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[check_failure_alert_sensor, run_failure_alert_sensor])
