"""The one-pass reading of usual events (`debezium._read_usual`) against the full reading (`_read_full`): whatever the
one-pass reading accepts, the full one accepts too and decodes to the same event; the usual events are all read in
one pass. Pure: no stack."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from knowton_pipeline.catalog import CDC_TABLES, SyncedTable, table
from knowton_pipeline.lib.debezium import (
    ChangeEvent,
    MalformedEventError,
    _read_full,
    _read_usual,
    decode_event,
)
from knowton_pipeline_tests.lib.test_debezium import (
    REAL_KEY,
    REAL_VALUE,
    TIMESTAMPS,
    envelope,
    json_values,
    key_bytes,
    rows,
    to_bytes,
)


def same_event(a: ChangeEvent, b: ChangeEvent) -> bool:
    """Equal, and every Decimal at the same scale (== on Decimal ignores 5.0 against 5.00)."""

    def scales(image: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v.as_tuple().exponent for k, v in (image or {}).items() if isinstance(v, Decimal)}

    return a == b and scales(a.after) == scales(b.after) and scales(a.before) == scales(b.before)


@st.composite
def usual_records(draw: st.DrawFn, synced: SyncedTable | None = None) -> tuple[SyncedTable, bytes, bytes]:
    synced = synced or draw(st.sampled_from(CDC_TABLES))
    op = draw(st.sampled_from(["c", "u", "d", "r"]))
    after = draw(rows(synced))
    before = None if op == "c" else {**draw(rows(synced)), **{k: after[k] for k in synced.key}}
    if op == "d":
        after = None
    event = envelope(synced, op, before, after, lsn=draw(st.integers(1, 2**62)), ts_ms=draw(st.integers(0, 2**42)))
    if draw(st.booleans()):
        event["source"]["sequence"] = json.dumps([str(draw(st.integers(1, 2**62))), str(event["source"]["lsn"])])
    return synced, key_bytes(synced, after or before or {}), to_bytes(event)


@settings(deadline=None)
@given(usual_records())
def test_the_usual_events_are_read_in_one_pass_as_the_full_reading_reads_them(
    record: tuple[SyncedTable, bytes, bytes],
) -> None:
    synced, key, value = record
    usual = _read_usual(synced, key, value)
    assert usual is not None
    assert same_event(usual, _read_full(synced, synced.topic, key, value))
    assert same_event(usual, _read_usual(synced, None, value) or usual)


def test_a_real_event_from_the_stack_is_read_in_one_pass() -> None:
    usual = _read_usual(table("User"), REAL_KEY, REAL_VALUE)
    assert usual is not None
    assert usual == decode_event("cdc-User", REAL_KEY, REAL_VALUE)


ODD_VALUES = st.one_of(
    json_values(st.text(max_size=6)),
    TIMESTAMPS.map(lambda t: t.isoformat()),
    st.sampled_from(
        [
            "2025-03-01T12:00:00.123456Z",
            "2025-03-01T12:00:00Z",
            "2025-03-01T12:00:00.1234567Z",
            "2025-03-01T12:00:00.123456+02:00",
            "2025-02-30T12:00:00.000000Z",
            "2025-03-01 12:00:00.123456Z",
            "1.50",
            "1.5000",
            "NaN",
            "1e3",
            "[]",
            '{"a": 1}',
            "null",
            "-0.00",
            "",
        ]
    ),
    st.integers(-(2**64), 2**64),
)


@st.composite
def odd_records(draw: st.DrawFn) -> tuple[SyncedTable, bytes | None, bytes]:
    """A usual record, then some of its fields replaced by values of any JSON type or removed."""
    synced, key, value = draw(usual_records())
    event = json.loads(value)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "source", "before", "after", "key"]))
        if where == "key":
            key = draw(st.sampled_from([None, b"", b"[]", b"{}", b'{"id": 1}', b'{"address": "0x1"}', key]))
            continue
        holder = event if where == "top" else event.get(where)
        if not isinstance(holder, dict):
            event[where] = draw(ODD_VALUES)
            continue
        names = [*sorted(holder), "extra"]
        name = draw(st.sampled_from(names))
        if draw(st.integers(0, 4)) == 0:
            holder.pop(name, None)
        else:
            holder[name] = draw(ODD_VALUES | st.just(None))
    if draw(st.integers(0, 9)) == 0:
        return synced, key, to_bytes(event)[: draw(st.integers(0, 40))]
    return synced, key, to_bytes(event)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(odd_records())
def test_what_the_one_pass_reading_accepts_the_full_reading_decodes_the_same(
    record: tuple[SyncedTable, bytes | None, bytes],
) -> None:
    synced, key, value = record
    usual = _read_usual(synced, key, value)
    try:
        full = _read_full(synced, synced.topic, key, value)
    except MalformedEventError:
        assert usual is None
        event("refused")
        return
    event("accepted in one pass" if usual is not None else "accepted by the full reading only")
    assert usual is None or same_event(usual, full)


def test_bytes_that_are_not_utf8_are_refused_in_a_field_the_pipeline_reads_and_ignored_in_one_it_does_not() -> None:
    read = REAL_VALUE.replace(b'"username":"probe"', b'"username":"pr\xffbe"')
    assert _read_usual(table("User"), REAL_KEY, read) is None
    with pytest.raises(MalformedEventError, match="UTF-8"):
        decode_event("cdc-User", REAL_KEY, read)
    unread = REAL_VALUE.replace(b'"transaction":null', b'"transaction":"\xff"')
    event = decode_event("cdc-User", REAL_KEY, unread)
    assert event is not None and event.after is not None and event.after["username"] == "probe"
