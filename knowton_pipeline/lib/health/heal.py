"""Bringing CDC back after its replication slot was lost (dropped, or `wal_status = lost` after
`max_slot_wal_keep_size`, or gone in a failover).

Debezium cannot resume: the position it stored is no longer on the server, and its task fails ("no longer
available on the server"); a slot recreated by hand starts at the current WAL position, so whatever was
committed in between would be skipped without a sound. Here the connector is stopped, the slot recreated, the
connector's offsets reset and the connector started streaming from the new slot without a snapshot; its
configured snapshot mode is then put back. What was committed in the gap never reaches Kafka, so the caller
re-syncs it key-exactly with a reconciliation and repair (versioned at a snapshot taken after the new slot
exists: nothing stale can win, and rows deleted in the gap are found as extra in the stores and removed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psycopg

from knowton_pipeline.lib.health.replication import SLOT, SlotHealth
from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.sql import read_sql

SNAPSHOT_MODE = "snapshot.mode"


class HealError(RuntimeError):
    """CDC could not be brought back; the message says at which step."""


def slot_lost(slot: SlotHealth) -> bool:
    """The slot is gone, or PostgreSQL removed WAL it needed: Debezium cannot resume from it."""
    return not slot.present or slot.wal_status == "lost"


@dataclass(frozen=True)
class Restored:
    slot_lsn: int  # where streaming resumed: changes committed before it and after the loss must be re-synced
    seconds: float


def _wait_state(connect: KafkaConnectClient, name: str, wanted: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        status = connect.status(name) or {}
        state = status.get("connector", {}).get("state")
        tasks = [t.get("state") for t in status.get("tasks", [])]
        if state == wanted and (wanted != "RUNNING" or (tasks and all(t == "RUNNING" for t in tasks))):
            return
        time.sleep(0.5)
    raise HealError(f"connector {name} did not reach {wanted} within {timeout:.0f} s (last state {state})")


def _slot_lsn(conn: psycopg.Connection) -> int | None:
    """Where the slot's consumer has confirmed up to; None when there is no slot."""
    row = conn.execute(
        "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def restore_cdc(
    conn: psycopg.Connection,
    connect: KafkaConnectClient,
    name: str,
    config: Mapping[str, str],
    *,
    timeout: float = 120.0,
    on_progress: Callable[[str], None] | None = None,
) -> Restored:
    """Recreate the slot and restart connector `name` (whose intended config is `config`) streaming from it.
    `conn` is the database owner's, in autocommit mode."""
    say = on_progress or (lambda _m: None)
    t0 = time.monotonic()
    if connect.status(name) is None:
        raise HealError(f"connector {name} is not deployed: deploy it (deploy_connectors) and heal again")
    connect.stop(name)
    _wait_state(connect, name, "STOPPED", timeout)
    say(f"connector {name} stopped")
    # A slot kept with wal_status lost cannot be read from again; with the connector stopped it is not active.
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s "
        "AND wal_status = 'lost'",
        (SLOT,),
    )
    # Creating a slot waits for every open transaction to end: a session left idle in a transaction must make the
    # heal fail (and be retried, with the incident open) rather than hang while holding the ClickHouse pool.
    conn.execute("SET lock_timeout = '60s'")
    conn.execute("SET statement_timeout = '180s'")
    try:
        conn.execute(read_sql("postgres", "enable-cdc.sql").encode())  # creates the slot, converges the publication
    finally:
        conn.execute("RESET lock_timeout")
        conn.execute("RESET statement_timeout")
    slot_lsn = _slot_lsn(conn)
    if slot_lsn is None:
        raise HealError(f"replication slot {SLOT} could not be recreated")
    say(f"replication slot {SLOT} recreated at {slot_lsn}")
    connect.reset_offsets(name)
    # No snapshot this once: the gap is re-synced key-exactly by the caller, not by re-reading every table.
    connect.put_config(name, {**config, SNAPSHOT_MODE: "no_data"})
    connect.resume(name)
    _wait_state(connect, name, "RUNNING", timeout)
    # Once an offset on the new slot is stored (the heartbeat produces a record within seconds, and the worker
    # flushes offsets every offset.flush.interval.ms), the configured snapshot mode takes no snapshot: put it back.
    deadline = time.monotonic() + timeout
    while not connect.offsets(name):
        if time.monotonic() > deadline:
            raise HealError(f"connector {name} stored no offset on the new slot within {timeout:.0f} s")
        time.sleep(0.5)
    connect.put_config(name, dict(config))
    _wait_state(connect, name, "RUNNING", timeout)
    say(f"connector {name} streaming again from the new slot")
    return Restored(slot_lsn, time.monotonic() - t0)


def resume_cdc(
    conn: psycopg.Connection,
    connect: KafkaConnectClient,
    name: str,
    config: Mapping[str, str],
    *,
    timeout: float = 120.0,
    on_progress: Callable[[str], None] | None = None,
) -> Restored:
    """Finish a heal interrupted after the slot was recreated: the connector runs its configured config again
    (resumed if a heal left it stopped). Its offsets are not touched: they are on the new slot by now, or it
    stored none yet and the configured snapshot mode re-reads the tables, which loses nothing."""
    say = on_progress or (lambda _m: None)
    t0 = time.monotonic()
    if (connect.config(name) or {}) != dict(config):
        connect.put_config(name, dict(config))
    connect.resume(name)
    _wait_state(connect, name, "RUNNING", timeout)
    say(f"connector {name} running its configured config")
    return Restored(_slot_lsn(conn) or 0, time.monotonic() - t0)
