"""Debezium streams INSERT, UPDATE and DELETE on "User" to cdc-User with full before-images and LSNs."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.stack.manager import Stack


def _consumer_at_end(settings: Settings, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    # Every partition: a row's changes land in the one its key hashes to.
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
    # Resolve the end offsets now, before the changes are made.
    consumer.poll(1.0)
    return consumer


def test_insert_update_delete_on_user_reach_cdc_user_within_10_seconds(
    stack: Stack, settings: Settings, pg: psycopg.Connection
) -> None:
    consumer = _consumer_at_end(settings, "cdc-User")
    address = "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    username = f"cdc-test-{address[2:10]}"
    pg.execute(
        'INSERT INTO "User" (address, username, email, bio) VALUES (%s, %s, %s, %s)',
        (address, username, None, "héllo 世界"),
    )
    pg.execute('UPDATE "User" SET reputation = 7, email = %s WHERE address = %s', ("a@example.com", address))
    pg.execute('DELETE FROM "User" WHERE address = %s', (address,))
    t_changed = time.monotonic()

    events: list[dict] = []
    deadline = t_changed + 10
    while time.monotonic() < deadline and len([e for e in events if e]) < 3:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        if json.loads(msg.key() or b"null") != {"address": address}:
            continue
        events.append(json.loads(msg.value()) if msg.value() is not None else None)
    consumer.close()

    changes = [e for e in events if e]
    assert [e["op"] for e in changes] == ["c", "u", "d"], events
    create, update, delete = changes
    assert create["before"] is None and create["after"]["bio"] == "héllo 世界"
    # REPLICA IDENTITY FULL: every column of the old row, not just the key.
    assert update["before"]["reputation"] == 0 and update["before"]["email"] is None
    assert update["before"]["username"] == username
    assert update["after"]["reputation"] == 7 and update["after"]["email"] == "a@example.com"
    assert delete["after"] is None
    assert delete["before"]["reputation"] == 7 and delete["before"]["bio"] == "héllo 世界"
    lsns = [e["source"]["lsn"] for e in changes]
    assert all(isinstance(lsn, int) and lsn > 0 for lsn in lsns)
    assert lsns == sorted(lsns) and len(set(lsns)) == 3
    assert {e["source"]["table"] for e in changes} == {"User"}
