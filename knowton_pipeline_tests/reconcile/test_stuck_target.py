"""In flight must not hide a stuck target, on the real stack: a key updated every 2 s while the apply is stopped
keeps changing in PostgreSQL, but its target never moves, so it is reported as lagging, not counted clean."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import Reconcile, insert_user


def test_a_key_updated_every_2_s_while_the_apply_is_stopped_is_reported_as_lagging(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    es: Elasticsearch,
    reconcile: Reconcile,
) -> None:
    address = insert_user(pg, reputation=0)
    apply()
    stop = threading.Event()
    first_update = threading.Event()

    def keep_updating() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            n = 0
            while not stop.wait(2.0 if n else 0.0):
                n += 1
                conn.execute('UPDATE "User" SET reputation = %s WHERE address = %s', (n, address))
                first_update.set()

    writer = threading.Thread(target=keep_updating)
    writer.start()
    try:
        # The key must differ before the first comparison: a reconciliation started before the writer's first
        # commit would find it in step, and rightly say so.
        assert first_update.wait(30), "the writer never updated the key"
        for target in ("clickhouse", "elasticsearch"):
            result = reconcile("User", target, mode="incremental", settle_seconds=3.0, stuck_seconds=8.0)
            assert not result.clean, target
            assert address in result.lagging and result.lagging[address] >= 8.0, target
            assert address in result.differences.different and address not in result.in_flight
    finally:
        stop.set()
        writer.join()
    # Once the apply has run, the key is in step again: reported no longer.
    apply()
    for target in ("clickhouse", "elasticsearch"):
        result = reconcile("User", target, mode="incremental", settle_seconds=3.0, stuck_seconds=8.0)
        assert address not in result.lagging and address not in result.differences.different
