"""An idle transaction must not stall the pipeline, on the real stack: with a session left idle in transaction,
a Content update still reaches its search document, and the health check names the culprit instead."""

from __future__ import annotations

import time
from collections.abc import Callable

import dagster as dg
import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import assert_reconciled, es_source, insert_content, insert_user
from knowton_pipeline_tests.postgres.test_replication import _verdict, run_checks


def test_a_session_idle_in_transaction_neither_stalls_a_content_update_nor_goes_unnamed(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg)
    content = insert_content(pg, creator, title="before")
    apply()
    bystander = insert_user(pg)
    with psycopg.connect(**settings.pg_conninfo(), application_name="forgotten-console") as idle:  # type: ignore[arg-type]
        # It wrote, so it holds a transaction id and a row lock, and then nobody commits it.
        idle.execute('UPDATE "User" SET bio = %s WHERE address = %s', ("never committed", bystander))
        pg.execute('UPDATE "Content" SET title = %s WHERE id = %s', ("after", content))
        stats = apply()  # the Content document is re-read in a snapshot: it must not wait for the idle session
        assert stats.dead_lettered == {"clickhouse": 0, "elasticsearch": 0}
        doc = es_source(es, "knowton-contents", str(content))
        assert doc is not None and doc["title"] == "after"

        time.sleep(2.5)
        checks = run_checks(
            dg.DagsterInstance.ephemeral(), idle_transaction_warn_seconds=1.0, idle_transaction_error_seconds=2.0
        )
        check = checks["idle_transactions"]
        assert _verdict(check) == "error"
        pid = idle.info.backend_pid
        assert f"pid {pid}" in check.description and "forgotten-console" in check.description
        assert "never committed" not in check.description  # values are parameters, not in the statement text
        assert pid in check.metadata["idle_transaction_pids"].value
        idle.rollback()
    assert _verdict(run_checks(dg.DagsterInstance.ephemeral())["idle_transactions"]) == "ok"
    assert_reconciled(settings, ch, es, "Content", [content])
