"""Shared fixtures: the real local stack (started if needed, never skipped) and its clients."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.connectors import deploy_connectors, load_connector_configs
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.schema import apply_all
from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings
from knowton_pipeline.stack.manager import Stack

CDC_CONNECTOR = "postgres-cdc-source-connector"
TEST_OUTPUT = PROJECT_ROOT / "test-output"


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Stack]:
    """The real stack: brought up (idempotent), schemas applied, the CDC connector RUNNING.

    A component that does not come up fails the tests that need it; nothing is skipped.
    """
    stack = Stack(settings, echo=lambda m: None)
    stack.up()
    os.environ.update(settings.export_env(include_secrets=True))
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    for _ in apply_all(settings):
        pass
    client = KafkaConnectClient(settings.connect_url)
    deploy_connectors(client, load_connector_configs())

    def running() -> bool:
        st = client.status(CDC_CONNECTOR) or {}
        tasks = st.get("tasks", [])
        return (
            st.get("connector", {}).get("state") == "RUNNING"
            and bool(tasks)
            and all(t["state"] == "RUNNING" for t in tasks)
        )

    wait_for(running, timeout=60, what=f"{CDC_CONNECTOR} and its task RUNNING")
    yield stack


@pytest.fixture
def pg(stack: Stack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        yield conn


@pytest.fixture
def es(stack: Stack, settings: Settings) -> Iterator[Elasticsearch]:
    client = Elasticsearch(settings.es_url, request_timeout=30)
    yield client
    client.close()


@pytest.fixture
def connect_client(stack: Stack, settings: Settings) -> KafkaConnectClient:
    return KafkaConnectClient(settings.connect_url)


@pytest.fixture
def scratch_home(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A stack home for a second, throwaway stack. Under the main home, which the unprivileged
    stack user can enter (pytest's own tmp folders are private to root)."""
    import shutil

    path = settings.home / "test-stacks" / request.node.name[:40]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    path.chmod(0o755)
    (path / "dist").symlink_to(settings.home / "dist")
    yield path
    shutil.rmtree(path, ignore_errors=True)


from knowton_pipeline_tests.alert_receiver import receiver  # noqa: E402, F401  (the alert webhook fixture)
