"""run_failure_alert_sensor on real failed runs of this code location, delivering to a real HTTP receiver."""

from __future__ import annotations

from typing import Any

import dagster as dg

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.alerts.sensors import run_failure_alert_sensor
from knowton_pipeline.defs.resources import AlertsResource, KafkaConnectResource, build_resources
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import Receiver


def _fail(
    job: str, op: str, config: dict[str, Any], instance: dg.DagsterInstance, **resources: Any
) -> dg.ExecuteInProcessResult:
    result = (
        defs()
        .resolve_job_def(job)
        .execute_in_process(
            run_config={"ops": {op: {"config": config}}},
            instance=instance,
            resources={**build_resources(), **resources},
            raise_on_error=False,
        )
    )
    assert not result.success
    return result


def _sense(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance, receiver: Receiver) -> None:
    event = result.get_run_failure_event()
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"alerts": AlertsResource(webhook_url=receiver.url)},
    ).for_run_failure()
    run_failure_alert_sensor(context)


def test_a_failed_run_is_alerted_with_its_job_and_message(stack: Stack, receiver: Receiver) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = _fail("reconcile", "reconcile_stores", {"tables": ["Nope"]}, instance)
    _sense(result, instance, receiver)
    assert len(receiver.received) == 1
    posted = receiver.received[0]
    assert "Run of reconcile failed" in posted["text"]
    detail = posted["attachments"][0]
    assert "reconcile_stores: " in detail["text"] and "unknown table 'Nope'" in detail["text"]  # step and why
    fields = {f["title"]: f["value"] for f in detail["fields"]}
    assert fields == {"run": result.run_id, "job": "reconcile"}


def test_an_exception_raised_by_an_op_is_alerted_with_its_own_message(stack: Stack, receiver: Receiver) -> None:
    instance = dg.DagsterInstance.ephemeral()
    nowhere = KafkaConnectResource(url="http://127.0.0.1:9")  # the discard port: nothing answers
    result = _fail("deploy_connectors", "deploy_connector_configs", {}, instance, kafka_connect=nowhere)
    _sense(result, instance, receiver)
    detail = receiver.received[0]["attachments"][0]["text"]
    assert detail.startswith("deploy_connector_configs: ")
    assert "KafkaConnectError: Kafka Connect at http://127.0.0.1:9 is unreachable" in detail
    assert "Error occurred while executing" not in detail  # not Dagster's wrapper, which only names the op


def test_a_failed_connector_restart_is_left_to_the_connector_health_sensor(stack: Stack, receiver: Receiver) -> None:
    instance = dg.DagsterInstance.ephemeral()
    config = {"connectors": ["no-such-connector"], "wait_seconds": 1}
    result = _fail("restart_failed_connectors", "restart_connectors", config, instance)
    _sense(result, instance, receiver)
    assert receiver.received == []  # connector_health_sensor alerts once its restarts run out
