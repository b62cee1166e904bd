"""Kafka Connect health as one report: every connector's and task's state, the failed ones with their
trace, connectors missing from Connect, and deployed configs that differ from `connectors/`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from knowton_pipeline.lib.connectors import diff_config
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient, KafkaConnectError

TRACE_CHARS = 2000  # enough for the exception and its first frames; a full Java trace is far longer
CAUSE_CHARS = 500


@dataclass
class TaskState:
    id: int
    state: str
    worker: str | None = None
    trace: str | None = None


@dataclass
class ConnectorHealth:
    name: str
    state: str
    tasks: list[TaskState] = field(default_factory=list)
    trace: str | None = None
    config_drift: list[str] = field(default_factory=list)  # config keys that differ from connectors/
    # A digest of the deployed config (None when not fetched): a new one means a new deployment. Only a digest,
    # so a secret in the config never reaches a cursor or a log.
    config_digest: str | None = None

    @property
    def failed(self) -> bool:
        return self.state == "FAILED" or any(t.state == "FAILED" for t in self.tasks)

    @property
    def _first_trace(self) -> str | None:
        traces = [self.trace] + [t.trace for t in self.tasks if t.state == "FAILED"]
        return next((t for t in traces if t), None)

    @property
    def failure_trace(self) -> str | None:
        first = self._first_trace
        return first[:TRACE_CHARS] if first else None

    @property
    def failure_cause(self) -> str | None:
        return trace_cause(self._first_trace)

    @property
    def healthy(self) -> bool:
        """RUNNING with at least one task, and every task RUNNING."""
        return self.state == "RUNNING" and bool(self.tasks) and self.running_tasks == len(self.tasks)

    @property
    def running_tasks(self) -> int:
        return sum(1 for t in self.tasks if t.state == "RUNNING")


def trace_cause(trace: str | None) -> str | None:
    """The one line of a Java stack trace that says why: its innermost `Caused by:`, else its first line."""
    lines = [line.strip() for line in (trace or "").splitlines() if line.strip()]
    if not lines:
        return None
    causes = [line.removeprefix("Caused by:").strip() for line in lines if line.startswith("Caused by:")]
    return (causes[-1] if causes else lines[0])[:CAUSE_CHARS]


@dataclass
class ConnectHealth:
    reachable: bool
    error: str | None = None
    connectors: dict[str, ConnectorHealth] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # in connectors/, not in Connect
    seconds: float = 0.0

    @property
    def failed(self) -> list[ConnectorHealth]:
        return [c for c in self.connectors.values() if c.failed]

    @property
    def drifted(self) -> list[ConnectorHealth]:
        return [c for c in self.connectors.values() if c.config_drift]

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.failed and not self.missing and not self.drifted


def connector_from_status(
    name: str,
    status: dict[str, Any],
    config: dict[str, str] | None = None,
    expected: dict[str, str] | None = None,
) -> ConnectorHealth:
    """A connector's health from its status (`GET /connectors/{name}/status`), with the keys of its deployed
    `config` that differ from `expected` when both are given."""
    tasks = [
        TaskState(int(t.get("id", 0)), str(t.get("state", "UNKNOWN")), t.get("worker_id"), t.get("trace"))
        for t in status.get("tasks", [])
    ]
    connector = status.get("connector", {})
    drift = diff_config(config or {}, expected) if expected is not None else []
    digest = config_digest(config) if config is not None else None
    return ConnectorHealth(name, str(connector.get("state", "UNKNOWN")), tasks, connector.get("trace"), drift, digest)


def config_digest(config: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def connect_health(client: KafkaConnectClient, expected: dict[str, dict[str, str]]) -> ConnectHealth:
    """One `GET /connectors?expand=status&expand=info`; never raises for an unreachable Connect."""
    t0 = time.monotonic()
    try:
        body = client.connectors_with_status()
    except KafkaConnectError as exc:
        return ConnectHealth(False, str(exc), seconds=time.monotonic() - t0)
    connectors = {
        name: connector_from_status(
            name, value.get("status", {}), value.get("info", {}).get("config", {}), expected.get(name)
        )
        for name, value in sorted(body.items())
    }
    missing = sorted(set(expected) - set(connectors))
    return ConnectHealth(True, None, connectors, missing, time.monotonic() - t0)
