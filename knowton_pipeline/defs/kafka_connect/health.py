"""`connector_health_sensor` and `restart_failed_connectors`: Kafka Connect watched on every tick, failed
connectors and tasks restarted with capped exponential backoff, and alerts when that is not enough.

The cursor (JSON, shown on the sensor's page) keeps per connector the restart attempts, when the next
one is due and the last failure trace, the count of ticks Connect did not answer, and the alert state.
A connector that is deleted, or deployed again with another config, starts over from a fresh entry.
"""

import time
from collections.abc import Callable
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field

from knowton_pipeline.catalog import CDC_TABLES
from knowton_pipeline.defs.cursors import AlertCursor
from knowton_pipeline.defs.kafka_connect.assets import CDC_CONNECTOR, cdc_topic_key
from knowton_pipeline.defs.resources import AlertsResource, KafkaConnectResource
from knowton_pipeline.lib.connectors import load_connector_configs
from knowton_pipeline.lib.health.alerts import Alert, AlertBook, Dispatch
from knowton_pipeline.lib.health.connect import (
    ConnectHealth,
    ConnectorHealth,
    connect_health,
    connector_from_status,
)
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient, KafkaConnectError

OBSERVE_EVERY_SECONDS = 300.0  # states are observed on change, and at least this often


class ConnectorHealthPolicy(dg.ConfigurableResource):
    """How the sensor acts: restart attempts and their backoff, and when an unreachable Connect is alerted."""

    max_restarts: int = 5
    backoff_seconds: float = 30.0  # before the 2nd attempt; doubles after each
    healthy_seconds: float = 60.0  # seen RUNNING this long before the attempts count from zero again
    unreachable_ticks: int = 3
    request_timeout_seconds: float = 3.0


class RestartConfig(dg.Config):
    connectors: list[str] = Field(default_factory=list, description="empty: every failed connector")
    wait_seconds: float = Field(60.0, description="how long the connector may take to be RUNNING again")
    stable_seconds: float = Field(
        10.0,
        description=(
            "how long it must then stay RUNNING (on top of wait_seconds): a task whose fault persists fails "
            "again within seconds"
        ),
    )


def _wait_held(client: KafkaConnectClient, name: str, wait_seconds: float, stable_seconds: float) -> str:
    """'RUNNING' once the connector and all its tasks have been RUNNING for `stable_seconds`; otherwise what
    went wrong: the cause when it failed again, or that it never came up within `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    running_since: float | None = None
    restarted = False  # seen out of FAILED since the restart request (RESTARTING, UNASSIGNED or RUNNING)
    while True:
        status = client.status(name)
        health = connector_from_status(name, status) if status else None
        now = time.monotonic()
        cause = (health.failure_cause or "no trace") if health and health.failed else None
        restarted = restarted or (health is not None and not health.failed)
        if health and health.healthy:
            running_since = now if running_since is None else running_since
            if now - running_since >= stable_seconds:
                return "RUNNING"
        else:
            running_since = None
            if cause and restarted:  # it came back, then failed again: the fault is still there
                return f"FAILED again: {cause}"
            if now >= deadline:
                return f"still FAILED: {cause}" if cause else "still not running"
        time.sleep(0.5)


@dg.op(
    description=(
        "POST /connectors/{name}/restart?includeTasks=true&onlyFailed=true, then wait until it is RUNNING and "
        "stays RUNNING."
    )
)
def restart_connectors(
    context: dg.OpExecutionContext, config: RestartConfig, kafka_connect: KafkaConnectResource
) -> dg.Output[dict[str, str]]:
    client = kafka_connect.get_client()
    names = config.connectors or [c.name for c in connect_health(client, {}).failed]
    outcome: dict[str, str] = {}
    for name in names:
        if client.restart(name, include_tasks=True, only_failed=True) == 404:
            outcome[name] = "not found: Kafka Connect has no such connector"
            continue
        context.log.info(f"restart requested for {name} (failed tasks only)")
        outcome[name] = _wait_held(client, name, config.wait_seconds, config.stable_seconds)
        context.log.info(f"{name}: {outcome[name]}")
    stuck = {n: state for n, state in outcome.items() if state != "RUNNING"}
    if stuck:
        raise dg.Failure(
            "restart did not hold: " + "; ".join(f"{n}: {state}" for n, state in stuck.items()),
            metadata={"connectors": dg.MetadataValue.json(outcome)},
        )
    return dg.Output(outcome, metadata={"restarted": len(outcome), "connectors": dg.MetadataValue.json(outcome)})


@dg.job(description="Restart failed Kafka Connect connectors and tasks; launched by connector_health_sensor.")
def restart_failed_connectors() -> None:
    restart_connectors()


def _observations(
    health: ConnectorHealth, attempts: int, healed_after: float | None = None
) -> list[dg.AssetObservation]:
    metadata: dict[str, Any] = {
        "connector": health.name,
        "connector_state": health.state,
        "tasks_running": dg.IntMetadataValue(health.running_tasks),
        "tasks_failed": dg.IntMetadataValue(sum(1 for t in health.tasks if t.state == "FAILED")),
        "restart_attempts": dg.IntMetadataValue(attempts),
    }
    if healed_after is not None:
        # From the first tick that saw it FAILED to the first that saw it healthy again: the UI plots it.
        metadata["time_to_heal_seconds"] = dg.FloatMetadataValue(round(healed_after, 1))
    if health.failure_cause:
        metadata["last_cause"] = health.failure_cause
    if health.failure_trace:
        metadata["last_trace"] = dg.MetadataValue.md(f"```\n{health.failure_trace}\n```")
    topics = [cdc_topic_key(t) for t in CDC_TABLES] if health.name == CDC_CONNECTOR else []
    return [dg.AssetObservation(asset_key=key, metadata=metadata) for key in topics]


Signature = tuple[str, tuple[str, ...], int]  # connector state, task states, restart attempts


class ConnectorEntry(BaseModel):
    """What the sensor keeps about one deployed connector."""

    attempts: int = 0  # restarts requested since it was last seen healthy for healthy_seconds
    next_at: float = 0.0  # no restart before this time (epoch seconds): the backoff
    last_trace: str | None = None
    last_cause: str | None = None
    config_digest: str | None = None  # of the config Connect runs: another one is a new deployment
    running_since: float | None = None  # seen healthy on every tick since; None: not healthy at the last tick
    failed_since: float | None = None  # first seen FAILED (epoch seconds); None: not failed since it was healthy
    observed: tuple[Signature, float] | None = None  # the states last recorded on the topic assets, and when


class ConnectorHealthCursor(AlertCursor):
    """The cursor of `connector_health_sensor`."""

    unreachable_ticks: int = 0  # consecutive ticks Connect did not answer
    connectors: dict[str, ConnectorEntry] = Field(default_factory=dict)


CONNECTOR_ALERTS = ("failed", "config")  # alert keys `connector:<name>:<kind>` that live and die with a deployment


def _delivered(alert: Alert) -> bool:
    return True


def evaluate(
    health: ConnectHealth,
    state: ConnectorHealthCursor,
    policy: ConnectorHealthPolicy,
    now: float,
    throttle_seconds: float,
    send: Callable[[Alert], bool] = _delivered,
) -> tuple[list[dg.RunRequest], list[Alert], list[dg.AssetObservation]]:
    """One tick's decisions, from the report and the cursor state (updated in place).

    Every message due is handed to `send`; only those it delivered are recorded as sent, the others are
    due again next tick. Returns the runs to request, the messages due and the observations."""
    book = AlertBook.from_json(state.alerts)
    runs: list[dg.RunRequest] = []
    alerts: list[Alert] = []
    observations: list[dg.AssetObservation] = []

    def note(key: str, failing: bool, alert: Alert, recovery: Alert | None = None) -> None:
        message = book.update(alert, failing, now, throttle_seconds, recovery)
        if message is not None:
            alerts.append(message)
            if send(message):
                book.mark_sent(message, now)

    ticks = 0 if health.reachable else state.unreachable_ticks + 1
    state.unreachable_ticks = ticks
    note(
        "connect:unreachable",
        ticks >= policy.unreachable_ticks,
        Alert(
            "connect:unreachable",
            "error",
            "Kafka Connect is unreachable",
            f"No answer for {ticks} consecutive checks: {health.error}",
            {"ticks": str(ticks)},
        ),
    )
    if not health.reachable:
        state.alerts = book.to_json()
        return runs, alerts, observations

    connectors = state.connectors
    # Deleted (absent from Connect), or deployed anew with another config since the last tick: the restarts,
    # backoff and alerts of the old deployment say nothing about the new one, which starts from nothing.
    ended: dict[str, str] = {}
    for name, entry in connectors.items():
        c = health.connectors.get(name)
        if c is None:
            ended[name] = "was deleted from Kafka Connect"
        elif None not in (entry.config_digest, c.config_digest) and entry.config_digest != c.config_digest:
            ended[name] = "was deployed again with another config"
    for key in list(book.keys):  # an alert whose recovery could not be delivered when its connector went
        name, _, kind = key.removeprefix("connector:").rpartition(":")
        if key.startswith("connector:") and kind in CONNECTOR_ALERTS and name not in health.connectors:
            ended.setdefault(name, "was deleted from Kafka Connect")
    for name, why in sorted(ended.items()):
        connectors.pop(name, None)
        for kind in CONNECTOR_ALERTS:
            key = f"connector:{name}:{kind}"
            if key in book.keys:
                end = Alert(key, "recovery", f"Ended: connector {name} {why}", "Its earlier alert no longer applies.")
                note(key, False, end, end)
                if not book.keys[key]["alerted"]:  # nothing (more) to announce
                    book.forget(key)
    for name, c in health.connectors.items():
        entry = connectors.setdefault(name, ConnectorEntry())
        entry.config_digest = c.config_digest
        healed_after = None
        if c.failed and entry.failed_since is None:
            entry.failed_since = now
        elif c.healthy and entry.failed_since is not None:
            healed_after, entry.failed_since = now - entry.failed_since, None
        if not c.healthy:
            entry.running_since = None
        if c.failed:
            entry.last_trace, entry.last_cause = c.failure_trace, c.failure_cause
            if entry.attempts < policy.max_restarts and now >= entry.next_at:
                entry.attempts += 1
                entry.next_at = now + policy.backoff_seconds * 2 ** (entry.attempts - 1)
                runs.append(
                    dg.RunRequest(
                        run_key=f"restart-{name}-{entry.attempts}-{int(now)}",
                        run_config=dg.RunConfig(ops={restart_connectors.name: RestartConfig(connectors=[name])}),
                        tags={"knowton/connector": name, "knowton/restart-attempt": str(entry.attempts)},
                    )
                )
        elif c.healthy:
            # A fault that persists lets a restarted task run for a few seconds before it fails again; the
            # attempts count from zero only once it has been seen RUNNING for healthy_seconds.
            if entry.running_since is None:
                entry.running_since = now
            if now - entry.running_since >= policy.healthy_seconds:
                entry.attempts, entry.next_at = 0, 0.0
        exhausted = c.failed and entry.attempts >= policy.max_restarts and now >= entry.next_at
        note(
            f"connector:{name}:failed",
            exhausted,
            Alert(
                f"connector:{name}:failed",
                "error",
                f"Connector {name} is still FAILED after {entry.attempts} restart(s)",
                f"{c.failure_cause or 'no trace'}\n\n{c.failure_trace or ''}"[:1500],
                {"connector": name, "state": c.state, "restart_attempts": str(entry.attempts)},
            ),
        )
        note(
            f"connector:{name}:config",
            bool(c.config_drift),
            Alert(
                f"connector:{name}:config",
                "warning",
                f"Connector {name} runs a config that differs from connectors/",
                f"Keys that differ: {', '.join(c.config_drift)}. Run deploy_connectors.",
                {"connector": name},
            ),
        )
        signature: Signature = (c.state, tuple(t.state for t in c.tasks), entry.attempts)
        changed = entry.observed is None or entry.observed[0] != signature
        if changed or healed_after is not None or now - entry.observed[1] >= OBSERVE_EVERY_SECONDS:  # type: ignore[index]
            observations += _observations(c, entry.attempts, healed_after)
            entry.observed = (signature, now)
    for name in sorted(set(load_connector_configs()) | set(health.missing)):
        note(
            f"connector:{name}:missing",
            name in health.missing,
            Alert(
                f"connector:{name}:missing",
                "error",
                f"Connector {name} is not deployed",
                "It is in connectors/ but Kafka Connect does not have it. Run deploy_connectors.",
                {"connector": name},
            ),
        )
    state.alerts = book.to_json()
    return runs, alerts, observations


@dg.sensor(
    job=restart_failed_connectors,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Polls Kafka Connect (GET /connectors?expand=status): records states on the cdc topics, restarts failed "
        "connectors and tasks with capped exponential backoff, alerts when Connect is unreachable or restarts run out."
    ),
)
def connector_health_sensor(
    context: dg.SensorEvaluationContext,
    kafka_connect: KafkaConnectResource,
    alerts: AlertsResource,
    connector_health_policy: ConnectorHealthPolicy,
) -> dg.SensorResult:
    state = ConnectorHealthCursor.load(context)
    client = KafkaConnectClient(kafka_connect.url, timeout=connector_health_policy.request_timeout_seconds)
    try:
        health = connect_health(client, load_connector_configs())
    except KafkaConnectError as exc:  # an answer that is not JSON, say
        health = ConnectHealth(False, str(exc))
    dispatch = Dispatch(alerts.channels(context.log), context.log)
    runs, _, observations = evaluate(
        health, state, connector_health_policy, time.time(), alerts.throttle_seconds, send=dispatch.send
    )
    summary = (
        f"Kafka Connect unreachable ({state.unreachable_ticks} tick(s)): {health.error}"
        if not health.reachable
        else f"{len(health.connectors)} connector(s), {len(health.failed)} failed, {len(runs)} restart(s) requested"
    )
    return dg.SensorResult(
        run_requests=runs,
        asset_events=observations,
        cursor=state.dump(),
        skip_reason=None if runs else summary,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        jobs=[restart_failed_connectors],
        sensors=[connector_health_sensor],
        resources={"connector_health_policy": ConnectorHealthPolicy()},
    )
