"""The files that name tables by hand (PostgreSQL DDL, CDC setup, connector config, ClickHouse DDL, index templates)
agree with the catalog. Pure: the files are parsed, no store is asked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from knowton_pipeline.catalog import CDC_TABLES, DLQ_TOPICS, TABLES, SyncedTable, table
from knowton_pipeline.lib.connectors import load_connector_configs
from knowton_pipeline.lib.settings import PROJECT_ROOT
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.stores import postgres as pg_store
from knowton_pipeline.lib.stores.clickhouse import mirror_errors
from knowton_pipeline.lib.stores.elasticsearch import mapping_errors
from knowton_pipeline.lib.sync.dlq import PARKED_TOPIC

SQL = PROJECT_ROOT / "sql"
# Published and captured besides the synced tables: Debezium reads its signals from it (incremental snapshots).
SIGNAL_TABLE = "ops.debezium_signal"


def _pg_name(t: SyncedTable) -> str:
    """How the SQL files spell the table: quoted when its name is not all lower case."""
    name = t.name if t.name == t.name.lower() else f'"{t.name}"'
    return f"{t.schema}.{name}"


def _statements(path: Path) -> str:
    return re.sub(r"--[^\n]*", "", path.read_text())


def _postgres_tables() -> dict[str, dict[str, tuple[str, int | None]]]:
    """CREATE TABLE statements of the PostgreSQL DDL: table -> column -> (information_schema type, scale)."""
    text = _statements(SQL / "postgres" / "schema.sql") + _statements(SQL / "postgres" / "ops.sql")
    spelled = {
        "text": "text",
        "integer": "integer",
        "int": "integer",
        "bigint": "bigint",
        "boolean": "boolean",
        "numeric": "numeric",
        "timestamptz": "timestamp with time zone",
        "text[]": "_text",
        "jsonb": "jsonb",
    }
    out: dict[str, dict[str, tuple[str, int | None]]] = {}
    for m in re.finditer(r'CREATE TABLE IF NOT EXISTS (\w+)\.("?\w+"?)\s*\((.*?)\n\);', text, re.S):
        columns: dict[str, tuple[str, int | None]] = {}
        for line in m.group(3).splitlines():
            col = re.match(r'\s+("?[A-Za-z_]\w*"?)\s+([a-z]+(?:\[\])?)(?:\((\d+),\s*(\d+)\))?', line)
            if col is None or col.group(1).upper() in ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK"):
                continue
            if col.group(2) not in spelled:
                continue  # a continuation line (a CHECK on the line below its column)
            columns[col.group(1).strip('"')] = (spelled[col.group(2)], int(col.group(4)) if col.group(4) else None)
        out[f"{m.group(1)}.{m.group(2).strip(chr(34))}"] = columns
    return out


def _clickhouse_mirrors() -> dict[str, dict[str, str]]:
    """CREATE TABLE statements of the mirror DDL: table -> column -> ClickHouse type."""
    out: dict[str, dict[str, str]] = {}
    text = _statements(SQL / "clickhouse" / "mirrors.sql")
    for m in re.finditer(r"CREATE TABLE IF NOT EXISTS knowton\.(\w+)\s*\((.*?)\n\)\s*ENGINE", text, re.S):
        columns = {}
        for line in m.group(2).splitlines():
            col = re.match(r"\s+(\w+)\s+(.+?),?\s*$", line)
            if col:
                columns[col.group(1)] = col.group(2)
        out[m.group(1)] = columns
    return out


def _captured() -> set[str]:
    return {t.qualified_name for t in CDC_TABLES} | {SIGNAL_TABLE}


@pytest.mark.parametrize("synced", CDC_TABLES, ids=lambda t: t.name)
def test_the_postgres_ddl_creates_every_catalog_column_with_its_type(synced: SyncedTable) -> None:
    tables = _postgres_tables()
    assert synced.qualified_name in tables, f"sql/postgres has no CREATE TABLE for {synced.qualified_name}"
    assert pg_store.column_errors(synced, tables[synced.qualified_name]) == []


def test_the_publication_and_the_replica_identity_cover_exactly_the_captured_tables() -> None:
    text = _statements(SQL / "postgres" / "enable-cdc.sql")
    names = {_pg_name(t): t.qualified_name for t in CDC_TABLES} | {SIGNAL_TABLE: SIGNAL_TABLE}
    lists = re.findall(r"(?:FOR TABLE|SET TABLE)\s+([^;]+?);", text)
    assert len(lists) == 2, "CREATE PUBLICATION ... FOR TABLE and ALTER PUBLICATION ... SET TABLE"
    for listed in lists:
        assert {names.get(n.strip(), n.strip()) for n in listed.split(",")} == _captured()
    full = {names.get(n, n) for n in re.findall(r"ALTER TABLE (\S+) REPLICA IDENTITY FULL", text)}
    assert full == _captured()


def test_the_connector_captures_exactly_the_catalog_tables_and_routes_them_to_their_topics() -> None:
    [config] = [c for c in load_connector_configs().values() if c["connector.class"].endswith("PostgresConnector")]
    included = {p.replace("\\.", ".") for p in config["table.include.list"].split(",")}
    assert included == _captured()
    assert config["signal.data.collection"] == SIGNAL_TABLE
    route = re.compile(config["transforms.route.regex"])
    for t in CDC_TABLES:
        debezium_topic = f"{config['topic.prefix']}.{t.schema}.{t.name}"
        assert route.fullmatch(debezium_topic), debezium_topic
        assert route.sub(config["transforms.route.replacement"].replace("$", "\\"), debezium_topic) == t.topic


@pytest.mark.parametrize("synced", CDC_TABLES, ids=lambda t: t.name)
def test_the_mirror_ddl_matches_the_catalog(synced: SyncedTable) -> None:
    mirrors = _clickhouse_mirrors()
    where = f"sql/clickhouse/mirrors.sql knowton.{synced.clickhouse_table}"
    assert mirror_errors(synced, mirrors.get(synced.clickhouse_table, {}), where) == []


def test_every_mirror_in_the_ddl_belongs_to_a_catalog_table() -> None:
    assert set(_clickhouse_mirrors()) == {t.clickhouse_table for t in CDC_TABLES}


@pytest.mark.parametrize("synced", [t for t in TABLES if t.elasticsearch_index], ids=lambda t: t.name)
def test_the_index_template_maps_every_document_field(synced: SyncedTable) -> None:
    path = SQL / "elasticsearch" / f"{synced.elasticsearch_index}.template.json"
    assert path.exists(), f"no index template {path.name} for {synced.name}"
    template = json.loads(path.read_text())
    assert template["index_patterns"] == [f"{synced.elasticsearch_index}-*"]
    properties = template["template"]["mappings"]["properties"]
    assert mapping_errors(synced, properties, path.name) == []


def test_every_index_template_belongs_to_a_catalog_table() -> None:
    templates = {p.name.removesuffix(".template.json") for p in (SQL / "elasticsearch").glob("*.template.json")}
    assert templates == {t.elasticsearch_index for t in TABLES if t.elasticsearch_index}


def test_the_dlq_topics_are_the_target_stores_own_and_the_parking_lot() -> None:
    assert set(DLQ_TOPICS) == {s.dlq_topic for s in TARGETS.values()} | {PARKED_TOPIC}


@pytest.mark.parametrize("synced", [t for t in TABLES if t.derived], ids=lambda t: t.name)
def test_derived_fields_depend_on_columns_that_exist(synced: SyncedTable) -> None:
    for d in synced.dependencies:
        other = table(d.table)
        assert other.column(d.column).type == synced.column(d.row_column).type, d
        for watched in d.watch:
            other.column(watched)
