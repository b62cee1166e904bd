"""Schema drift against the real stores: a new PostgreSQL column is a WARN naming it, a retyped one an ERROR
naming the column and both types; the Dagster check reports them with those severities."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import TABLES, table
from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.health.schema_drift import schema_drift
from knowton_pipeline.stack.manager import Stack


@pytest.fixture
def user_table(pg: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """Alterations of "User" made by a test are undone afterwards."""
    yield pg
    pg.execute('ALTER TABLE "User" DROP COLUMN IF EXISTS "nickname"')
    pg.execute('ALTER TABLE "User" ALTER COLUMN bio TYPE text')


def test_the_stores_agree_with_the_catalog(
    stack: Stack, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    for t in TABLES:
        drift = schema_drift(pg, t, clickhouse=ch, es=es)
        assert (drift.verdict, drift.errors, drift.new_in_postgres) == ("ok", [], []), t.name


def test_a_new_column_warns_and_a_retyped_one_is_an_error(
    stack: Stack, user_table: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    pg = user_table
    pg.execute('ALTER TABLE "User" ADD COLUMN "nickname" text')
    added = schema_drift(pg, table("User"), clickhouse=ch, es=es)
    assert (added.verdict, added.new_in_postgres, added.errors) == ("warn", ["nickname"], [])
    pg.execute('ALTER TABLE "User" ALTER COLUMN bio TYPE varchar(400)')
    retyped = schema_drift(pg, table("User"), clickhouse=ch, es=es)
    assert retyped.verdict == "error"
    assert retyped.errors == ["PostgreSQL: column bio is character varying, the catalog expects text"]

    with dg.instance_for_test() as instance:
        result = (
            defs()
            .resolve_job_def("health_checks")
            .execute_in_process(instance=instance, resources=build_resources(), op_selection=None)
        )
        evaluations = {
            e.event_specific_data.asset_key.to_user_string(): e.event_specific_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.event_specific_data.check_name == "schema_matches_stores"
        }
    user = evaluations["postgres/public/User"]
    assert user.passed is False and user.severity == dg.AssetCheckSeverity.ERROR
    assert "bio is character varying" in (user.description or "")
    assert user.metadata["new_in_postgres"].value == ["nickname"]
    assert evaluations["postgres/public/Content"].passed is True
