"""Shared fixtures: the tests' own stack (never the demo's), its clients and the CDC apply. Every test that
needs a stack is marked `stack` here, so `pytest -m "not stack"` runs the pure tests alone."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib import clickhouse
from knowton_pipeline.lib.connectors import deploy_connectors, load_connector_configs
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.schema import apply_all
from knowton_pipeline.lib.settings import Settings, SettingsError
from knowton_pipeline.stack.components import SERVERS
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import CDC_CONNECTOR, Receiver, make_applier, wait_for, wait_for_cdc
from knowton_pipeline_tests.stack_home import StackHomeError, isolated_env, prepare_home

if TYPE_CHECKING:
    from knowton_pipeline.lib.sync.apply import ApplyStats

# A test whose fixtures include one of these needs a stack: it is marked `stack`. `settings` are the stack's
# settings: every fixture that reaches the stack, its home or its embedded ClickHouse depends on them.
STACK_FIXTURES = frozenset({"settings"})

_refusal: list[str] = []  # why the stack tests cannot run in this environment (set by pytest_configure)


def pytest_configure(config: pytest.Config) -> None:
    """Point the run at the tests' own stack home before anything reads the settings, and export them: Dagster's
    EnvVar resources read them, also in pure tests that build jobs without a stack."""
    try:
        os.environ.update(isolated_env(os.environ))
    except StackHomeError as exc:
        _refusal.append(str(exc))
        return
    with contextlib.suppress(SettingsError):  # a bad setting fails the `settings` fixture, naming the variable
        os.environ.update(Settings.from_env().export_env(include_secrets=True))


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


def pytest_collection_finish(session: pytest.Session) -> None:
    if _refusal and any(item.get_closest_marker("stack") for item in session.items):
        pytest.exit(f"the stack tests do not run here: {_refusal[0]}", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings of the tests' stack (never the demo's: see pytest_configure)."""
    if _refusal:  # pytest_collection_finish stops such a run first; this keeps any other path safe too
        pytest.exit(f"the stack tests do not run here: {_refusal[0]}", returncode=pytest.ExitCode.USAGE_ERROR)
    return Settings.from_env()


@pytest.fixture(scope="session")
def stack_home(settings: Settings) -> Path:
    """The stack home the tests run on, laid out (its downloaded jars shared with the demo's home)."""
    prepare_home(settings.home)
    return settings.home


@pytest.fixture(scope="session")
def stack(settings: Settings, stack_home: Path) -> Iterator[Stack]:
    """The real stack: brought up (idempotent), schemas applied, the CDC connector RUNNING.

    A component that does not come up fails the tests that need it; nothing is skipped.
    """
    stack = Stack(settings, echo=lambda m: None)
    stack.up(SERVERS)  # the sinks are driven by the tests themselves
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
def ch(stack: Stack, settings: Settings) -> ClickHouseClient:
    return clickhouse.get_client(settings.clickhouse_dsn)


@pytest.fixture
def connect_client(stack: Stack, settings: Settings) -> KafkaConnectClient:
    return KafkaConnectClient(settings.connect_url)


@pytest.fixture
def apply(settings: Settings, ch: ClickHouseClient, es: Elasticsearch) -> Callable[[], ApplyStats]:
    """Run the CDC apply until the sync group has caught up with every change committed so far, and
    make its writes searchable."""

    def run() -> ApplyStats:
        wait_for_cdc(settings)
        stats = make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=180)
        es.indices.refresh(index="knowton-*")
        return stats

    return run


@pytest.fixture
def caught_up(apply: Callable[[], ApplyStats]) -> Iterator[None]:
    """Start each test from a caught-up pipeline, so its assertions see only its own changes."""
    apply()
    yield


@pytest.fixture
def scratch_home(stack_home: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A stack home for a second, throwaway stack. Under the tests' home, which the unprivileged
    stack user can enter (pytest's own tmp folders are private to root)."""
    path = stack_home / "test-stacks" / request.node.name[:40]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    path.chmod(0o755)
    (path / "dist").symlink_to(stack_home / "dist")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The alert webhook: a real HTTP endpoint recording what it receives."""
    r = Receiver()
    yield r
    r.server.shutdown()
