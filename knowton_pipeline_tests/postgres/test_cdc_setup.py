"""enable-cdc.sql: slot, publication, monitoring views and check_cdc_health(), applied twice harmlessly."""

from __future__ import annotations

import psycopg

from knowton_pipeline.catalog import CDC_TABLES
from knowton_pipeline.lib.schema import apply_postgres
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.stack.manager import Stack
from knowton_pipeline_tests.helpers import wait_for


def test_check_cdc_health_and_replication_status_report_the_slot_active(stack: Stack, pg: psycopg.Connection) -> None:
    def healthy() -> dict[str, tuple[str, str]]:
        rows = pg.execute("SELECT check_name, status, detail FROM check_cdc_health()").fetchall()
        result = {name: (status, detail) for name, status, detail in rows}
        return result if all(s == "OK" for s, _ in result.values()) else {}

    checks = wait_for(healthy, timeout=30, what="check_cdc_health() all OK")
    assert len(checks) >= 5
    slot = pg.execute("SELECT slot_name, plugin, active, wal_status, lag_bytes FROM replication_status").fetchall()
    assert [(s[0], s[1], s[2]) for s in slot] == [("knowton_cdc_slot", "pgoutput", True)]
    assert slot[0][3] in ("reserved", "extended")
    assert slot[0][4] >= 0


def test_published_tables_have_full_replica_identity(stack: Stack, pg: psycopg.Connection) -> None:
    rows = pg.execute("SELECT schemaname, tablename, replica_identity FROM published_tables").fetchall()
    # Debezium's signalling table is published too: it reads signals and snapshot watermarks from the stream.
    assert {(s, t) for s, t, _ in rows} == {(t.schema, t.name) for t in CDC_TABLES} | {("ops", "debezium_signal")}
    assert {r for _, _, r in rows} == {"full"}


def test_enable_cdc_applied_again_changes_nothing(stack: Stack, settings: Settings, pg: psycopg.Connection) -> None:
    def snapshot() -> tuple:
        slots = pg.execute("SELECT slot_name, plugin FROM pg_replication_slots ORDER BY 1").fetchall()
        pubs = pg.execute(
            "SELECT pubname, schemaname, tablename FROM pg_publication_tables ORDER BY 1, 2, 3"
        ).fetchall()
        return slots, pubs

    before = snapshot()
    list(apply_postgres(settings))
    list(apply_postgres(settings))
    assert snapshot() == before
    assert len(before[0]) == 1
