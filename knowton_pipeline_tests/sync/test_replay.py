"""DLQ replay: applies a record once its cause is fixed, parks it after the last attempt, never loses
one, and an old record replayed over newer data changes nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Producer
from elasticsearch import Elasticsearch

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.replay import DlqReplayer, ReplayConfig, ReplayStats, due_at_ms
from knowton_pipeline_tests.helpers import (
    ch_row,
    es_source,
    insert_user,
    read_topic_from,
    topic_end,
)


def replay(settings: Settings, ch: ClickHouseClient, es: Elasticsearch, **config: object) -> ReplayStats:
    cfg = ReplayConfig(bootstrap=settings.kafka_bootstrap, **config)  # type: ignore[arg-type]
    stats = DlqReplayer(cfg, clickhouse=ch, es=es, pg_conninfo=settings.pg_conninfo()).run(max_seconds=120)
    es.indices.refresh(index="knowton-*")
    return stats


def letters_for(settings: Settings, topic: str, start: Mapping[int, int], marker: bytes) -> list[dlq.DeadLetter]:
    waiting = sum(topic_end(settings, topic).values()) - sum(start.values())
    msgs = read_topic_from(settings, topic, start, waiting, timeout=10) if waiting > 0 else []
    return [dlq.DeadLetter.from_dlq_message(m, default_target="") for m in msgs if marker in (m.key() or b"")]


def test_reprocess_dlq_applies_a_record_once_its_cause_is_fixed(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    # The cause: the users alias points at an index whose mapping refuses the documents.
    broken = f"knowton-users-broken-{uuid.uuid4().hex[:6]}"
    es.indices.create(index=broken, mappings={"dynamic": "strict", "properties": {"reputation": {"type": "boolean"}}})
    (good,) = es.indices.get_alias(name="knowton-users")
    body = {"is_write_index": True}
    es.indices.update_aliases(
        actions=[
            {"remove": {"index": good, "alias": "knowton-users"}},
            {"add": {"index": broken, "alias": "knowton-users", **body}},
        ]
    )
    dlq_start = topic_end(settings, "dlq-elasticsearch-failed")
    try:
        address = insert_user(pg, reputation=7)
        stats = apply()
        assert stats.dead_lettered["elasticsearch"] >= 1
        assert ch_row(ch, "users", "address = {a:String}", {"a": address}) is not None  # ClickHouse was fine
    finally:
        # The fix: the alias back on the right index.
        from knowton_pipeline.lib.stores.elasticsearch import alias_body

        es.indices.update_aliases(
            actions=[
                {"remove": {"index": broken, "alias": "knowton-users"}},
                {"add": {"index": good, "alias": "knowton-users", **alias_body()}},
            ]
        )
        es.indices.delete(index=broken)
    [letter] = letters_for(settings, "dlq-elasticsearch-failed", dlq_start, address.encode())
    assert "mapper_parsing_exception" in letter.error_message or "document_parsing_exception" in letter.error_message

    stats = replay(settings, ch, es, ignore_backoff=True)
    assert stats.applied >= 1
    doc = es_source(es, "knowton-users", address)
    assert doc is not None and doc["reputation"] == 7
    assert letters_for(settings, "dlq-elasticsearch-failed", dlq_start, address.encode()) == [letter]  # not requeued


def test_a_record_that_keeps_failing_is_parked_after_the_last_attempt_never_dropped(
    caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    marker = f"0xpoison{uuid.uuid4().hex}".encode()
    source_offset = uuid.uuid4().int % 10**9
    start = {t: topic_end(settings, t) for t in (*dlq.TARGET_DLQ.values(), dlq.PARKED_TOPIC)}
    # A Kafka Connect sink's DLQ record: only Connect's headers, a value that can never be applied.
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(
        "dlq-clickhouse-failed",
        key=b'{"address": "' + marker + b'"}',
        value=b'{"op": "x"}',
        headers=[
            (dlq.H_TOPIC, b"cdc-User"),
            (dlq.H_PARTITION, b"0"),
            (dlq.H_OFFSET, str(source_offset).encode()),
            (dlq.H_CLASS, b"org.apache.kafka.connect.errors.DataException"),
            (dlq.H_MESSAGE, b"sink refused it"),
        ],
    )
    producer.flush(10)

    first = replay(settings, ch, es, ignore_backoff=True, max_attempts=3)
    assert first.requeued >= 1
    [requeued] = letters_for(settings, "dlq-clickhouse-failed", start["dlq-clickhouse-failed"], marker)[1:]
    assert requeued.attempts == 2 and requeued.offset == source_offset and requeued.topic == "cdc-User"
    assert requeued.error_class.endswith("MalformedEventError")

    second = replay(settings, ch, es, ignore_backoff=True, max_attempts=3)
    assert second.parked >= 1
    [parked] = letters_for(settings, dlq.PARKED_TOPIC, start[dlq.PARKED_TOPIC], marker)
    assert parked.attempts == 3 and parked.target == "clickhouse"
    row = pg.execute(
        "SELECT attempts, error_class, record_key FROM ops.dlq_parked "
        "WHERE target = 'clickhouse' AND source_topic = 'cdc-User' AND source_offset = %s",
        (source_offset,),
    ).fetchone()
    assert row is not None and row[0] == 3 and bytes(row[2]) == b'{"address": "' + marker + b'"}'
    # Parked, not requeued: the DLQ holds only its first two attempts, and another run parks nothing more.
    replay(settings, ch, es, ignore_backoff=True, max_attempts=3)
    assert len(letters_for(settings, "dlq-clickhouse-failed", start["dlq-clickhouse-failed"], marker)) == 2
    assert len(letters_for(settings, dlq.PARKED_TOPIC, start[dlq.PARKED_TOPIC], marker)) == 1


def test_a_record_waiting_for_its_backoff_is_kept_not_attempted(
    caught_up: None, settings: Settings, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    marker = f"0xwait{uuid.uuid4().hex}".encode()
    start = topic_end(settings, "dlq-clickhouse-failed")
    now_ms = int(time.time() * 1000)
    letter = dlq.DeadLetter(
        target="clickhouse",
        topic="cdc-User",
        partition=0,
        offset=42,
        key=b'{"address": "' + marker + b'"}',
        value=b"{}",
        error_class="x",
        error_message="y",
        attempts=2,
        first_failure_ms=now_ms,
        last_failure_ms=now_ms,
    )
    dlq.publish(dlq.make_producer(settings.kafka_bootstrap), [letter])
    assert due_at_ms(letter, ReplayConfig(bootstrap="", backoff_base_seconds=30)) == now_ms + 60_000
    stats = replay(settings, ch, es, backoff_base_seconds=30)
    assert stats.not_due >= 1
    kept = letters_for(settings, "dlq-clickhouse-failed", start, marker)
    assert [(k.attempts, k.last_failure_ms) for k in kept] == [(2, now_ms), (2, now_ms)]


def test_replaying_an_old_record_over_newer_data_changes_nothing(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    start = topic_end(settings, "cdc-User")
    address = insert_user(pg, reputation=1)
    apply()
    [created] = [m for m in read_topic_from(settings, "cdc-User", start, 20, timeout=5) if address.encode() in m.key()]
    pg.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (address,))
    apply()
    old = dlq.DeadLetter(
        target="clickhouse",
        topic="cdc-User",
        partition=created.partition(),
        offset=created.offset(),
        key=created.key(),
        value=created.value(),
        error_class="x",
        error_message="old failure",
        first_failure_ms=1,
    )
    dlq.publish(
        dlq.make_producer(settings.kafka_bootstrap),
        [old, dlq.DeadLetter(**{**old.__dict__, "target": "elasticsearch"})],
    )
    stats = replay(settings, ch, es, ignore_backoff=True)
    assert stats.applied >= 2
    assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 2  # type: ignore[index]
    assert es_source(es, "knowton-users", address)["reputation"] == 2  # type: ignore[index]
