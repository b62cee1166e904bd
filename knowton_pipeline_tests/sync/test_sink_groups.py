"""Each store's sink in its own consumer group, on the real stack: an upgrade from the single shared group of earlier
releases starts each new group where the shared one had got to, and commits that position at once."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import CDC_TABLES
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync.apply import LEGACY_GROUP, ApplyConfig, ApplyStats, CdcSink, group_lag, sink_group
from knowton_pipeline_tests.helpers import ch_row, insert_user, topic_end, wait_for_cdc


def _delete_groups(settings: Settings, *groups: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_consumer_groups(list(groups), request_timeout=10).values():
        try:
            future.result()
        except Exception as exc:  # a group that does not exist is what we want
            if "GROUP_ID_NOT_FOUND" not in str(exc):
                raise


def test_a_new_sink_group_starts_where_the_shared_group_of_earlier_releases_got_to(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    topics = [t.topic for t in CDC_TABLES]
    ends = [TopicPartition(t, p, o) for t in topics for p, o in topic_end(settings, t).items()]
    assert sum(tp.offset for tp in ends) > 100, "enough history that a start from the beginning would show"
    # The shared group has applied everything so far; the ClickHouse sink's group does not exist yet.
    legacy = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": LEGACY_GROUP})
    try:
        legacy.commit(offsets=ends, asynchronous=False)
    finally:
        legacy.close()
    _delete_groups(settings, sink_group("clickhouse"))
    try:
        address = insert_user(pg, reputation=11)  # the one change after the shared group's position
        wait_for_cdc(settings)
        sink = CdcSink(
            ApplyConfig(bootstrap=settings.kafka_bootstrap),
            store="clickhouse",
            client=ch,
            pg_conninfo=settings.pg_conninfo(),
        )
        stats = sink.run(until_caught_up=True, max_seconds=120)
        assert 1 <= stats.per_table["User"] <= 2, stats.summary()  # not the topic's whole history
        assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 11  # type: ignore[index]
        # The adopted position was committed: the group's lag counts from there, not from the beginning.
        assert sum(group_lag(settings.kafka_bootstrap, sink_group("clickhouse"), topics).values()) <= 2
    finally:
        _delete_groups(settings, LEGACY_GROUP)
        apply()
