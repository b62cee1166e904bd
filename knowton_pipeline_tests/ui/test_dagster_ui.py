"""The Dagster UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): the asset graph
shows the pipeline from the PostgreSQL tables to the aggregates, and `reconcile` launched from the
launchpad runs and its checks appear. Screenshots go to the test's output folder.

The webserver runs on its own instance (a scratch DAGSTER_HOME, runs launched directly, no daemon, so no
sensor of the UI's acts on the shared stack) and its own embedded ClickHouse folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings
from knowton_pipeline.stack.manager import Stack

CHROMIUM = "/usr/bin/chromium"
# Chromium on a closed network: no background connections, no component updates (see the README).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "knowton_pipeline"
OUTPUT = PROJECT_ROOT / "test-output" / "ui"  # screenshots (git-ignored)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


@pytest.fixture(scope="module")
def ui(stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed: run scripts/setup.sh"
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    env = {
        **os.environ,
        **settings.export_env(include_secrets=True),
        "DAGSTER_HOME": str(home),
        "KNOWTON_CLICKHOUSE_DSN": f"chdb://{home / 'clickhouse'}",
    }
    venv = Path(sys.executable).parent
    subprocess.run([str(venv / "knowton"), "schema", "apply", "clickhouse"], env=env, check=True, capture_output=True)
    port = _free_port()
    log = (home / "webserver.log").open("w")
    proc = subprocess.Popen(
        [str(venv / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dagster-webserver exited: {(home / 'webserver.log').read_text()[-2000:]}")
            try:
                data = graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except (requests.RequestException, AssertionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the Dagster UI did not load the code location within 180 s")
            time.sleep(1)
        if OUTPUT.exists():
            shutil.rmtree(OUTPUT)
        OUTPUT.mkdir(parents=True)
        yield url, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page(ui: tuple[str, Path]) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 2400, "height": 2100})
        finally:
            browser.close()


def test_the_asset_graph_runs_from_postgres_tables_through_topics_to_mirrors_indices_and_aggregates(
    ui: tuple[str, Path], page: Page
) -> None:
    url, _ = ui
    nodes = graphql(url, "{ assetNodes { assetKey { path } dependencyKeys { path } } }")["assetNodes"]
    deps = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes}
    assert deps["kafka/topics/cdc-User"] == {"postgres/public/User"}
    assert "kafka/topics/cdc-User" in deps["clickhouse/knowton/users"]
    assert "kafka/topics/cdc-User" in deps["elasticsearch/knowton-users"]
    assert "clickhouse/knowton/users" in deps["clickhouse/knowton/user_activity"]
    assert "clickhouse/knowton/purchases" in deps["clickhouse/knowton/content_sales_daily"]

    page.goto(f"{url}/asset-groups")
    expand_every_group(page)
    try:
        for label in ("User", "cdc-User", "users", "knowton-users", "user_activity", "content_sales_daily"):
            page.get_by_text(label, exact=True).first.wait_for(timeout=30_000)
    finally:
        page.screenshot(path=str(OUTPUT / "asset-graph.png"))


def dismiss_welcome(page: Page) -> None:
    """A fresh instance greets the first visitor with a newsletter dialog: skip it."""
    with contextlib.suppress(PlaywrightTimeoutError):
        page.get_by_role("button", name="Skip").click(timeout=5_000)


def expand_every_group(page: Page) -> None:
    """Open every collapsed asset group of the lineage graph; the UI remembers it, and a reload fits the now
    expanded graph to the window."""
    page.get_by_text("clickhouse_aggregates").first.wait_for(timeout=60_000)
    dismiss_welcome(page)
    for _ in range(5):
        page.wait_for_timeout(2000)
        collapsed = page.locator("[aria-label='unfold_more']")
        if collapsed.count() == 0:
            return
        while collapsed.count():
            collapsed.first.click()
            page.wait_for_timeout(500)
        page.reload()
        page.get_by_text("clickhouse_aggregates").first.wait_for(timeout=60_000)
    raise AssertionError("asset groups stayed collapsed")


def test_reconcile_launched_from_the_launchpad_runs_and_its_checks_appear(ui: tuple[str, Path], page: Page) -> None:
    url, home = ui
    page.goto(f"{url}/locations/__repository__@{LOCATION}/jobs/reconcile/playground")
    launch = page.get_by_role("button", name="Launch run")
    launch.wait_for(timeout=60_000)
    page.screenshot(path=str(OUTPUT / "reconcile-launchpad.png"))
    launch.click()
    page.wait_for_url("**/runs/**", timeout=60_000)
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0]
    deadline = time.monotonic() + 300
    status = "STARTING"
    while time.monotonic() < deadline and status not in ("SUCCESS", "FAILURE", "CANCELED"):
        time.sleep(2)
        data = graphql(url, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})
        status = data["runOrError"]["status"]
    page.screenshot(path=str(OUTPUT / "reconcile-run.png"), full_page=True)
    assert status == "SUCCESS"

    with dg.DagsterInstance.from_config(str(home)) as instance:
        key = dg.AssetCheckKey(dg.AssetKey(["clickhouse", "knowton", "users"]), "matches_postgres")
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.run_id == run_id and record.status.value in ("SUCCEEDED", "FAILED")

    page.goto(f"{url}/assets/clickhouse/knowton/users?view=checks")
    page.get_by_text("matches_postgres").first.wait_for(timeout=60_000)
    page.screenshot(path=str(OUTPUT / "users-mirror-checks.png"), full_page=True)
