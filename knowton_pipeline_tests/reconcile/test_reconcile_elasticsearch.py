"""Elasticsearch and aggregates: drift made directly in the index or in an aggregate is reported exactly,
repair re-syncs exactly those keys, and a busy, healthy pipeline raises no alarm."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import date
from decimal import Decimal

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.aggregates import replace_day
from knowton_pipeline.lib.reconcile.run import repair_pair, result_keys
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import (
    Reconcile,
    insert_content,
    insert_purchase,
    insert_user,
    make_applier,
    new_address,
    new_keys,
)

USERS = "knowton-users"


def _repair(settings: Settings, ch: ClickHouseClient, es: Elasticsearch, result):  # type: ignore[no-untyped-def]
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        return repair_pair(
            result.table,
            result.target,
            result_keys(result),
            conn=conn,
            clients={"clickhouse": ch, "elasticsearch": es},
        )


def test_an_edit_made_in_the_index_is_caught_by_the_full_mode_and_repaired(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    es: Elasticsearch,
    ch: ClickHouseClient,
    settings: Settings,
    reconcile: Reconcile,
) -> None:
    users = [insert_user(pg, reputation=i, bio=f"bio {i}") for i in range(30)]
    apply()
    before = reconcile("User", "elasticsearch", mode="full")
    edited, removed, extra = users[5], users[11], new_address()
    # An edit made directly in the index: one field, nothing else (the stored hash is left as it was).
    es.update(index=USERS, id=edited, doc={"bio": "edited by hand"})
    es.delete(index=USERS, id=removed)
    template = es.get(index=USERS, id=users[0])["_source"]
    es.index(index=USERS, id=extra, document={**template, "address": extra})
    es.indices.refresh(index=USERS)

    full = reconcile("User", "elasticsearch", mode="full")
    assert new_keys(full, before) == {"missing": [removed], "extra": [extra], "different": {edited: ["bio"]}}
    # The stored-hash checksum finds what changes counts or stored hashes (the hand edit kept its stored hash:
    # it shows only when it shares a segment with other drift).
    quick = reconcile("User", "elasticsearch", mode="checksum")
    assert removed in quick.differences.missing_in_target and extra in quick.differences.extra_in_target

    repaired = _repair(settings, ch, es, full)
    assert repaired.verified and repaired.tombstones >= 1
    assert reconcile("User", "elasticsearch", mode="full").clean
    assert es.get(index=USERS, id=edited)["_source"]["bio"] == "bio 5"


def test_an_aggregate_row_changed_is_reported_with_its_column_and_repaired(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    es: Elasticsearch,
    ch: ClickHouseClient,
    settings: Settings,
    reconcile: Reconcile,
) -> None:
    day = date(2024, 3, 9)  # a day of this test's own, before the seeded data
    creator, buyer = insert_user(pg), insert_user(pg)
    content = insert_content(pg, creator, **{"createdAt": "2024-03-09T08:00:00Z"})
    for amount in ("1.500000", "2.250000"):
        insert_purchase(pg, content, buyer, amount=Decimal(amount), **{"createdAt": "2024-03-09T10:00:00Z"})
    apply()
    for name in ("user_activity", "content_sales_daily"):
        replace_day(ch, name, day)
        assert reconcile(name, days=[day]).clean, name
    ch.command(
        "ALTER TABLE knowton.content_sales_daily UPDATE revenue = revenue + 1 WHERE date = {d:Date} "
        "AND content_id = {c:Int64} SETTINGS mutations_sync = 1",
        parameters={"d": day, "c": content},
    )
    drifted = reconcile("content_sales_daily", days=[day])
    assert drifted.differences.different == {("2024-03-09", content, "ETH"): ["revenue"]}
    assert drifted.differences.missing_in_target == drifted.differences.extra_in_target == []
    assert _repair(settings, ch, es, drifted).verified
    assert reconcile("content_sales_daily", days=[day]).clean


def test_a_busy_healthy_pipeline_reports_no_drift(
    caught_up: None,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
    reconcile: Reconcile,
) -> None:
    before = {t: reconcile("User", t, settle_seconds=0) for t in ("clickhouse", "elasticsearch")}
    stop = threading.Event()
    applier = make_applier(settings, ch, es)
    worker = threading.Thread(target=lambda: applier.run(until_caught_up=False, stop=stop), daemon=True)
    written: list[str] = []

    def write() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            while not stop.is_set():
                written.append(insert_user(conn))
                conn.execute(
                    'UPDATE "User" SET reputation = reputation + 1, "updatedAt" = now() WHERE address = %s',
                    (written[len(written) // 2],),
                )
                time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    worker.start()
    writer.start()
    try:
        time.sleep(3)
        results = {t: reconcile("User", t, settle_seconds=3, recheck_rounds=4) for t in ("clickhouse", "elasticsearch")}
    finally:
        stop.set()
        writer.join(30)
        worker.join(60)
    assert len(written) > 20
    for target, result in results.items():
        assert new_keys(result, before[target]) == {"missing": [], "extra": [], "different": {}}, target
