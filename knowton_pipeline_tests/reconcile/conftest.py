"""The reconciliation tests drive the pipeline with the sync tests' fixtures, and reconcile with one helper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.reconcile.engine import ReconcileOptions, ReconcileResult
from knowton_pipeline.lib.reconcile.run import reconcile_pair
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline_tests.sync.conftest import apply, caught_up, ch  # noqa: F401

Reconcile = Callable[..., ReconcileResult]


@pytest.fixture
def reconcile(settings: Settings, ch: ClickHouseClient, es: Elasticsearch) -> Reconcile:  # noqa: F811
    """reconcile(name, target, mode=..., threshold=..., settle_seconds=...): one run on its own connection."""

    def run(name: str, target: str = "clickhouse", **options: Any) -> ReconcileResult:
        opts = {"threshold": 16, "fanout": 8, "settle_seconds": 0.5, **options}
        days = opts.pop("days", None)
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            return reconcile_pair(
                name, target, conn=conn, clickhouse=ch, es=es, options=ReconcileOptions(**opts), days=days
            )

    return run


def new_keys(after: ReconcileResult, before: ReconcileResult) -> dict[str, Any]:
    """What `after` reports beyond `before` (drift left by earlier tests stays out of the assertions)."""
    a, b = after.differences, before.differences
    return {
        "missing": sorted(set(a.missing_in_target) - set(b.missing_in_target)),
        "extra": sorted(set(a.extra_in_target) - set(b.extra_in_target)),
        "different": {k: v for k, v in a.different.items() if b.different.get(k) != v},
    }
