"""Drift confirmed at a known position, on the real stack: once the target's sink has applied past an anchor taken
after the comparison, an idle pipeline confirms drift at once, a busy one reports none of its in-flight rows, and a
target whose sink does not move while its source does is reported as lagging."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import Reconcile, insert_user, make_applier

TARGETS = ("clickhouse", "elasticsearch")


def _edit_behind_the_pipelines_back(target: str, address: str, ch: ClickHouseClient, es: Elasticsearch) -> None:
    if target == "clickhouse":
        ch.command(
            "INSERT INTO knowton.users SELECT * REPLACE (reputation + 100 AS reputation, version + 1 AS version) "
            "FROM knowton.users AS u FINAL WHERE u.address = {a:String}",
            parameters={"a": address},
        )
    else:
        es.update(index="knowton-users", id=address, doc={"reputation": 4242})
        es.indices.refresh(index="knowton-users")


@pytest.mark.parametrize("target", TARGETS)
def test_an_idle_pipeline_confirms_drift_without_waiting(
    target: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
    reconcile: Reconcile,
) -> None:
    address = insert_user(pg, reputation=1)
    apply()
    _edit_behind_the_pipelines_back(target, address, ch, es)
    # A fixed wait would take settle_seconds (30 s) at least; the position is reached within a second or two.
    result = reconcile("User", target, mode="incremental", settle_seconds=30.0, at_position=True)
    assert result.differences.different.get(address) == ["reputation"], result.as_dict()
    assert result.confirmed_by == "position" and not result.lagging
    assert result.seconds < 15.0


def test_a_busy_pipeline_never_reports_its_in_flight_rows(
    caught_up: None,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
    reconcile: Reconcile,
) -> None:
    busy = [insert_user(pg, reputation=0) for _ in range(8)]
    stop = threading.Event()
    applier = make_applier(settings, ch, es)
    worker = threading.Thread(target=lambda: applier.run(until_caught_up=False, stop=stop), daemon=True)
    updates = [0]

    def keep_updating() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                updates[0] += 1
                conn.execute(
                    'UPDATE "User" SET reputation = %s, "updatedAt" = now() WHERE address = %s',
                    (updates[0], busy[updates[0] % len(busy)]),
                )
                time.sleep(0.05)

    writer = threading.Thread(target=keep_updating, daemon=True)
    worker.start()
    writer.start()
    try:
        time.sleep(3)
        results = {
            t: reconcile("User", t, mode="incremental", settle_seconds=5.0, stuck_seconds=30.0, at_position=True)
            for t in TARGETS
        }
    finally:
        stop.set()
        writer.join(30)
        worker.join(60)
    assert updates[0] > 40
    for target, result in results.items():
        d = result.differences
        reported = {*d.missing_in_target, *d.extra_in_target, *d.different} & set(busy)
        assert not reported and not result.lagging, (target, result.as_dict())
        assert result.confirmed_by in ("position", "none"), target


def test_a_target_whose_sink_does_not_move_while_its_source_does_is_reported_as_lagging(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    reconcile: Reconcile,
) -> None:
    address = insert_user(pg, reputation=0)
    apply()
    stop, updated = threading.Event(), threading.Event()

    def keep_updating() -> None:  # the apply is stopped: the sinks' groups never reach the anchors
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            n = 0
            while not stop.wait(1.0 if n else 0.0):
                n += 1
                conn.execute('UPDATE "User" SET reputation = %s WHERE address = %s', (n, address))
                updated.set()

    writer = threading.Thread(target=keep_updating)
    writer.start()
    try:
        assert updated.wait(10)  # the source has moved before the first pass reads it
        for target in TARGETS:
            result = reconcile("User", target, mode="incremental", stuck_seconds=4.0, at_position=True)
            assert address in result.lagging and result.lagging[address] >= 4.0, (target, result.as_dict())
            assert address in result.differences.different and address not in result.in_flight
            assert result.confirmed_by == "position"
    finally:
        stop.set()
        writer.join()
    apply()  # in step again: reported no longer
    for target in TARGETS:
        result = reconcile("User", target, mode="incremental", stuck_seconds=4.0, at_position=True)
        assert address not in result.lagging and address not in result.differences.different
