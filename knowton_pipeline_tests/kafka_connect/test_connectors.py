"""The connector runs through the Connect REST API; deploying twice changes nothing the second time."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from knowton_pipeline.defs.kafka_connect.jobs import deploy_connectors
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.connectors import ConnectorConfigError, load_connector_configs
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import CDC_CONNECTOR


def test_cdc_connector_and_its_task_are_running(stack: Stack, connect_client: KafkaConnectClient) -> None:
    listing = connect_client.connectors_with_status()
    status = listing[CDC_CONNECTOR]["status"]
    assert status["connector"]["state"] == "RUNNING"
    assert [t["state"] for t in status["tasks"]] == ["RUNNING"]
    assert listing[CDC_CONNECTOR]["info"]["config"]["plugin.name"] == "pgoutput"


def test_deploy_connectors_job_run_twice_changes_nothing_the_second_time(
    stack: Stack, connect_client: KafkaConnectClient
) -> None:
    # Drift the deployed config so the first run has something to put back.
    drifted = {**connect_client.config(CDC_CONNECTOR), "heartbeat.interval.ms": "7000"}  # type: ignore[dict-item]
    connect_client.put_config(CDC_CONNECTOR, drifted)

    def run() -> dict:
        result = deploy_connectors.execute_in_process(resources=build_resources())
        assert result.success
        out = result.output_for_node("deploy_connector_configs")
        metadata = next(
            e.event_specific_data.metadata  # type: ignore[union-attr]
            for e in result.all_node_events
            if e.event_type_value == "STEP_OUTPUT"
        )
        return {"output": out, "changed": metadata["changed"].value}

    first = run()
    assert first["changed"] == 1
    assert first["output"][0]["action"] == "updated"
    assert first["output"][0]["changed_keys"] == ["heartbeat.interval.ms"]
    second = run()
    assert second["changed"] == 0
    assert [r["action"] for r in second["output"]] == ["unchanged"]
    assert connect_client.config(CDC_CONNECTOR)["heartbeat.interval.ms"] == "5000"  # type: ignore[index]


def test_secrets_are_referenced_not_committed() -> None:
    config = load_connector_configs()[CDC_CONNECTOR]
    assert config["database.password"] == "${env:KNOWTON_CDC_PASSWORD}"


def test_a_literal_password_in_a_connector_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(
        json.dumps({"name": "bad", "config": {"connector.class": "X", "database.password": "hunter2"}})
    )
    with pytest.raises(ConnectorConfigError, match="literal secret") as err:
        load_connector_configs(tmp_path)
    assert "hunter2" not in str(err.value)


def test_deploy_connectors_job_is_launchable_from_definitions() -> None:
    from knowton_pipeline.definitions import defs

    assert dg.Definitions.validate_loadable(defs()) is None
