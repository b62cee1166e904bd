"""Replication health: the Debezium slot as PostgreSQL reports it (pg_replication_slots), and end-to-end
lag: the newest heartbeat (Debezium writes one every few seconds) that the apply has written, against now.

A verdict per check: "ok", "warn" or "error", with the numbers behind it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import psycopg
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, TopicPartition

from knowton_pipeline.catalog import HEARTBEAT
from knowton_pipeline.lib.sync.apply import DEFAULT_GROUP, committed_timestamp

Verdict = Literal["ok", "warn", "error"]
SLOT = "knowton_cdc_slot"


@dataclass(frozen=True)
class SlotThresholds:
    warn_retained_bytes: int = 1 << 30  # 1 GiB of WAL held back for the slot
    error_retained_bytes: int = 8 << 30


@dataclass(frozen=True)
class SlotHealth:
    slot: str
    present: bool
    active: bool = False
    wal_status: str | None = None
    retained_bytes: int = 0
    verdict: Verdict = "error"
    reason: str = ""


def slot_health(
    conn: psycopg.Connection, thresholds: SlotThresholds = SlotThresholds(), slot: str = SLOT
) -> SlotHealth:
    row = conn.execute(
        "SELECT active, wal_status, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return SlotHealth(slot, False, reason=f"replication slot {slot} does not exist: CDC has nowhere to resume from")
    active, wal_status, retained = bool(row[0]), row[1], int(row[2])
    verdict: Verdict = "ok"
    reasons = []
    if wal_status in ("unreserved", "lost"):
        verdict = "error"
        reasons.append(f"wal_status is {wal_status}: WAL the slot needs is (about to be) removed")
    if retained >= thresholds.error_retained_bytes:
        verdict = "error"
        reasons.append(f"{retained} bytes of WAL retained (error above {thresholds.error_retained_bytes})")
    elif retained >= thresholds.warn_retained_bytes:
        verdict = "warn" if verdict == "ok" else verdict
        reasons.append(f"{retained} bytes of WAL retained (warn above {thresholds.warn_retained_bytes})")
    if not active:
        verdict = "warn" if verdict == "ok" else verdict
        reasons.append("the slot is inactive: no Debezium task is reading it")
    return SlotHealth(slot, True, active, wal_status, retained, verdict, "; ".join(reasons) or "active and current")


@dataclass(frozen=True)
class LagThresholds:
    warn_seconds: float = 30.0
    error_seconds: float = 60.0  # the seed's one-minute alert


@dataclass(frozen=True)
class LagHealth:
    applied_heartbeat: datetime | None
    lag_seconds: float | None
    verdict: Verdict
    reason: str


def applied_heartbeat(bootstrap: str, group_id: str = DEFAULT_GROUP, timeout: float = 5.0) -> datetime | None:
    """When Debezium produced the newest heartbeat the sync group has applied and committed: the apply
    commits an offset only after both stores hold the batch, so this is end-to-end for both. No store is
    opened (a sensor must not open the embedded ClickHouse engine).

    The apply stores that record's timestamp with the offset; an offset committed without it costs a fetch
    of the record (about a second on the dev stack, against a few milliseconds)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        [committed] = consumer.committed([TopicPartition(HEARTBEAT.topic, 0)], timeout=timeout)
        if committed.offset <= 0:
            return None
        stored = committed_timestamp(committed)
        if stored is not None:
            return stored
        consumer.assign([TopicPartition(HEARTBEAT.topic, 0, committed.offset - 1)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                kind, ms = msg.timestamp()
                return datetime.fromtimestamp(ms / 1000, UTC) if kind != TIMESTAMP_NOT_AVAILABLE else None
        raise KafkaException(f"could not read {HEARTBEAT.topic} at offset {committed.offset - 1} within {timeout} s")
    finally:
        consumer.close()


def heartbeat_lag(
    applied: datetime | None, thresholds: LagThresholds = LagThresholds(), now: datetime | None = None
) -> LagHealth:
    if applied is None:
        return LagHealth(None, None, "error", "no heartbeat has been applied yet")
    lag = max(0.0, ((now or datetime.now(UTC)) - applied).total_seconds())
    verdict: Verdict = "error" if lag > thresholds.error_seconds else "warn" if lag > thresholds.warn_seconds else "ok"
    return LagHealth(applied, lag, verdict, f"the newest applied heartbeat is {lag:.1f} s old")
