"""The reconciliation tests' fixture: one reconciliation run on its own connection."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.reconcile.engine import ReconcileOptions, ReconcileResult
from knowton_pipeline.lib.reconcile.run import reconcile_pair
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline_tests.helpers import Reconcile


@pytest.fixture
def reconcile(settings: Settings, ch: ClickHouseClient, es: Elasticsearch) -> Reconcile:
    """reconcile(name, target, mode=..., threshold=..., settle_seconds=..., at_position=False): one run on its own
    connection. `at_position=True` confirms differences at a known position (the sinks' groups in Kafka) instead of
    after the fixed wait; `on_progress` is passed on."""

    def run(name: str, target: str = "clickhouse", **options: Any) -> ReconcileResult:
        opts = {"threshold": 16, "fanout": 8, "settle_seconds": 0.5, **options}
        days = opts.pop("days", None)
        bootstrap = settings.kafka_bootstrap if opts.pop("at_position", False) else None
        on_progress = opts.pop("on_progress", None)
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            return reconcile_pair(
                name,
                target,
                conn=conn,
                clients={"clickhouse": ch, "elasticsearch": es},
                options=ReconcileOptions(**opts),
                days=days,
                on_progress=on_progress,
                bootstrap=bootstrap,
            )

    return run
