"""Adding a table is its catalog entry and its DDL, nothing else: a table that exists only in this test gets its
mirror and index assets, its reconciliation checks, a backfill, a reconciliation that finds drift in both targets
and a repair that clears it, all from the project's own definitions (run in `second_table.py`, a process of its
own, since the catalog entry must be there before the definitions load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores.elasticsearch import alias_body

INDEX = "knowton-tags"
TEXT = {"type": "keyword"}
MAPPING = {
    "dynamic": "strict",
    "properties": {
        "id": {"type": "long"},
        "label": TEXT,
        "weight": {"type": "double"},
        "created_at": {"type": "date"},
        "updated_at": {"type": "date"},
        "indexed_at": {"type": "date"},
        "pg_lsn": {"type": "long"},
        "is_deleted": {"type": "boolean"},
        "row_hash": TEXT,
        "row_hash_hi": {"type": "integer"},
        "row_hash_mid": {"type": "integer"},
        "row_hash_lo": {"type": "integer"},
    },
}


@pytest.fixture
def tag_table(pg: psycopg.Connection, es: Elasticsearch) -> Iterator[None]:
    """The table's DDL in PostgreSQL and Elasticsearch, and a few rows; gone afterwards."""
    pg.execute('DROP TABLE IF EXISTS public."Tag"')
    pg.execute(
        'CREATE TABLE public."Tag" (id bigint PRIMARY KEY, label text NOT NULL, weight numeric(12,2) NOT NULL, '
        'note text NULL, "createdAt" timestamptz NOT NULL DEFAULT now(), "updatedAt" timestamptz NOT NULL DEFAULT now())'
    )
    pg.execute(
        'INSERT INTO public."Tag" (id, label, weight, note) '
        "SELECT i, 'tag ' || i, i * 1.25, CASE WHEN i % 2 = 0 THEN 'even' END FROM generate_series(1, 40) AS i"
    )
    es.indices.delete(index=f"{INDEX}-v1", ignore_unavailable=True)
    es.indices.create(index=f"{INDEX}-v1", mappings=MAPPING, aliases={INDEX: alias_body()})
    try:
        yield
    finally:
        pg.execute('DROP TABLE IF EXISTS public."Tag"')
        es.indices.delete(index=f"{INDEX}-v1", ignore_unavailable=True)


def test_a_table_added_to_the_catalog_gets_mirror_index_checks_and_reconciliation_with_no_other_edit(
    tag_table: None, settings: Settings, tmp_path: Path
) -> None:
    env = {**os.environ, "KNOWTON_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'clickhouse'}"}
    run = subprocess.run(
        [sys.executable, "-m", "knowton_pipeline_tests.second_table"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["assets"] == [
        "clickhouse/knowton/tags",
        "elasticsearch/knowton-tags",
        "kafka/topics/cdc-Tag",
        "postgres/public/Tag",
    ]
    assert {"clickhouse/knowton/tags:matches_postgres", "elasticsearch/knowton-tags:matches_postgres"} <= set(
        report["checks"]
    )
    assert report["materialized clickhouse/knowton/tags"] and report["materialized elasticsearch/knowton-tags"]
    mirror, index = "clickhouse/knowton/tags:matches_postgres", "elasticsearch/knowton-tags:matches_postgres"
    assert report["first"][mirror]["passed"] and report["first"][index]["passed"], report["first"]
    assert report["drifted"][mirror] == {"passed": False, "differing_keys": 1}, report["drifted"]
    assert report["drifted"][index] == {"passed": False, "differing_keys": 1}, report["drifted"]
    assert report["after_repair"][mirror]["passed"] and report["after_repair"][index]["passed"], report
