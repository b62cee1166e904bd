"""Replication health: the Debezium slot as PostgreSQL reports it (pg_replication_slots), and end-to-end
lag per store and topic: the age of the oldest data change a store's sink has not applied yet, on every `cdc-*`
topic, and at least the age of the newest heartbeat Debezium has published (it writes one every few seconds, so
an old one means Debezium itself is behind). A data topic far behind cannot hide behind fresh heartbeats, and a
store whose sink has nothing left to apply is green at rest without applying heartbeats.

A verdict per check: "ok", "warn" or "error", with the numbers behind it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import psycopg
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, TopicPartition

from knowton_pipeline.catalog import CDC_TABLES, HEARTBEAT, TABLES
from knowton_pipeline.lib.sync.apply import committed_timestamp, sink_group

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
    per_topic_seconds: Mapping[str, float] = field(default_factory=dict)  # age of each topic's oldest waiting change


def applied_heartbeat(bootstrap: str, group_id: str, timeout: float = 5.0) -> datetime | None:
    """When Debezium produced the newest heartbeat a sink's group has applied and committed: a sink commits an
    offset only after its store holds the batch, so this is end-to-end for that store. No store is
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


@dataclass(frozen=True)
class TopicLag:
    """How far a sink's group is on one topic (all its partitions)."""

    topic: str
    behind: int  # records written to the topic and not applied yet
    oldest_unapplied: datetime | None  # when the oldest of them was produced; None when caught up
    newest_applied: datetime | None  # when the newest applied record was produced, where it is known


def topic_lags(
    bootstrap: str, group_id: str, topics: Sequence[str] | None = None, timeout: float = 5.0
) -> list[TopicLag]:
    """Per `cdc-*` topic: records not applied by `group_id`, and the time of the oldest one (one fetch per
    partition that is behind). The heartbeat topic's newest applied record comes from the committed offset's
    stored time (see `applied_heartbeat`). No store is opened."""
    names = list(topics or [t.topic for t in CDC_TABLES])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(timeout=timeout).topics
        parts = [TopicPartition(t, p) for t in names if t in meta for p in meta[t].partitions]
        committed = consumer.committed(parts, timeout=timeout) if parts else []
        behind: dict[str, int] = dict.fromkeys(names, 0)
        newest: dict[str, datetime | None] = dict.fromkeys(names)
        fetch: list[TopicPartition] = []
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            position = max(tp.offset, low) if tp.offset >= 0 else low
            stored = committed_timestamp(tp) if tp.offset >= 0 else None
            if stored is not None and (newest[tp.topic] is None or stored > newest[tp.topic]):  # type: ignore[operator]
                newest[tp.topic] = stored
            if high > position:
                behind[tp.topic] += high - position
                fetch.append(TopicPartition(tp.topic, tp.partition, position))
        oldest = _first_record_times(consumer, fetch, timeout)
    finally:
        consumer.close()
    return [TopicLag(t, behind[t], oldest.get(t), newest[t]) for t in names]


def _first_record_times(consumer: Consumer, starts: list[TopicPartition], timeout: float) -> dict[str, datetime]:
    """The produce time of the record at each given position, the earliest per topic."""
    if not starts:
        return {}
    consumer.assign(starts)
    wanted = {(tp.topic, tp.partition) for tp in starts}
    found: dict[str, datetime] = {}
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() or (msg.topic(), msg.partition()) not in wanted:
            continue
        wanted.discard((msg.topic(), msg.partition()))
        kind, ms = msg.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE:
            continue
        at = datetime.fromtimestamp(ms / 1000, UTC)
        if msg.topic() not in found or at < found[msg.topic()]:
            found[msg.topic()] = at
    if wanted:
        raise KafkaException(f"could not read the oldest unapplied record of {sorted(wanted)} within {timeout} s")
    return found


def pipeline_lag(
    lags: Sequence[TopicLag],
    published: datetime | None,
    thresholds: LagThresholds = LagThresholds(),
    now: datetime | None = None,
    applied: datetime | None = None,
) -> LagHealth:
    """End-to-end lag of one store: the age of the oldest data change waiting for its sink on any topic, and at least
    the age of the newest heartbeat Debezium has published (`published`: it writes one every few seconds, so an
    old one means changes committed since are not even in Kafka). A store whose sink holds every published data
    change is as fresh as that heartbeat, whether or not the sink has applied the heartbeat itself; `applied`, the
    newest heartbeat the sink applied, is only reported."""
    now = now or datetime.now(UTC)
    waiting = [(max(0.0, (now - t.oldest_unapplied).total_seconds()), t) for t in lags if t.oldest_unapplied]
    per_topic = {t.topic: 0.0 for t in lags}
    for age, t in waiting:
        per_topic[t.topic] = age
    if published is None:
        return LagHealth(applied, None, "error", "Debezium has not published a heartbeat yet", per_topic)
    heartbeat_age = max(0.0, (now - published).total_seconds())
    if waiting:
        age, worst = max(waiting, key=lambda w: w[0])
        reason = f"{worst.topic}: {worst.behind} change(s) not applied, the oldest {age:.1f} s old"
        lag = max(age, heartbeat_age)
    else:
        lag = heartbeat_age
        reason = f"every data change published is applied; Debezium's newest heartbeat is {lag:.1f} s old"
    verdict: Verdict = "error" if lag > thresholds.error_seconds else "warn" if lag > thresholds.warn_seconds else "ok"
    return LagHealth(applied, lag, verdict, reason, per_topic)


def published_heartbeat(bootstrap: str, timeout: float = 5.0) -> datetime | None:
    """When Debezium produced the newest record of the heartbeat topic; None when it holds none."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "knowton-lag-probe", "enable.auto.commit": False})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(HEARTBEAT.topic, 0), timeout=timeout, cached=False)
        if high <= low:
            return None
        return _first_record_times(consumer, [TopicPartition(HEARTBEAT.topic, 0, high - 1)], timeout)[HEARTBEAT.topic]
    finally:
        consumer.close()


def end_to_end_lag(
    store: str,
    bootstrap: str,
    thresholds: LagThresholds = LagThresholds(),
    published: datetime | None = None,
) -> LagHealth:
    """`pipeline_lag` of a store's sink, measured now from its group's committed offsets on the data topics.
    `published` (the newest heartbeat in Kafka) is read when not given."""
    group_id = sink_group(store)
    lags = topic_lags(bootstrap, group_id, [t.topic for t in TABLES])
    return pipeline_lag(
        lags,
        published if published is not None else published_heartbeat(bootstrap),
        thresholds,
        applied=applied_heartbeat(bootstrap, group_id),
    )


@dataclass(frozen=True)
class IdleTransaction:
    """A session idle inside an open transaction: it holds back vacuum and the locks it took."""

    pid: int
    age_seconds: float
    state: str
    user: str
    application: str
    query: str  # its last statement, cut to QUERY_CHARS


QUERY_CHARS = 200


@dataclass(frozen=True)
class IdleTransactionThresholds:
    warn_seconds: float = 60.0
    error_seconds: float = 300.0


@dataclass(frozen=True)
class IdleTransactionHealth:
    sessions: tuple[IdleTransaction, ...]
    verdict: Verdict
    reason: str


def idle_transactions(conn: psycopg.Connection, older_than_seconds: float) -> list[IdleTransaction]:
    """Sessions of this database idle in a transaction opened more than `older_than_seconds` ago, oldest first."""
    rows = conn.execute(
        "SELECT pid, extract(epoch FROM now() - xact_start)::float8, state, coalesce(usename::text, ''), "
        "coalesce(application_name, ''), left(coalesce(query, ''), %s) FROM pg_stat_activity "
        "WHERE datname = current_database() AND state LIKE 'idle in transaction%%' "
        "AND xact_start < now() - make_interval(secs => %s) ORDER BY xact_start",
        (QUERY_CHARS, older_than_seconds),
    ).fetchall()
    return [IdleTransaction(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


def idle_transaction_health(
    conn: psycopg.Connection, thresholds: IdleTransactionThresholds = IdleTransactionThresholds()
) -> IdleTransactionHealth:
    sessions = tuple(idle_transactions(conn, thresholds.warn_seconds))
    if not sessions:
        return IdleTransactionHealth(
            (), "ok", f"no session idle in a transaction for over {thresholds.warn_seconds:g} s"
        )
    oldest = sessions[0]
    verdict: Verdict = "error" if oldest.age_seconds > thresholds.error_seconds else "warn"
    reason = (
        f"{len(sessions)} session(s) idle in a transaction; the oldest: pid {oldest.pid} ({oldest.user}, "
        f"{oldest.application or 'no application name'}), open {oldest.age_seconds:.0f} s, last statement: "
        f"{oldest.query!r}. End it with SELECT pg_terminate_backend({oldest.pid}) if its owner cannot."
    )
    return IdleTransactionHealth(sessions, verdict, reason)
