"""The compiled reading of a batch (`lib/_columns.c`, behind `debezium.read_change_columns`) against the msgspec
reading it stands in for: it takes the usual batches, spelled any way JSON allows, and gives the same columns; any
other batch it either leaves to the msgspec reading (None) or reads to the very same columns. It never takes what
the msgspec reading refuses, whatever the bytes. Pure: no stack.

The suite runs a trimmed, fixed set of examples; `KNOWTON_FUZZ_SCALE=100` runs a hundred times as many, drawn
afresh each time (a long drill, README "Benchmarks")."""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from knowton_pipeline.catalog import SyncedTable, table
from knowton_pipeline.lib import debezium
from knowton_pipeline.lib.debezium import ChangeColumns, _read_compiled, _read_msgspec, read_change_columns
from knowton_pipeline_tests.lib.test_debezium import REAL_KEY, REAL_VALUE
from knowton_pipeline_tests.lib.test_debezium_columns import batches, odd, unzip

# The tables the compiled reading takes: every column text, an integer, bool, numeric or timestamptz.
COMPILED = [table("User"), table("Purchase"), table("heartbeat")]
Records = list[tuple[bytes | None, bytes]]
SCALE = float(os.environ.get("KNOWTON_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=SCALE == 1,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def test_the_compiled_reading_is_built_and_takes_the_tables_it_can() -> None:
    # The install builds it (pyproject.toml); without a C compiler the msgspec reading is all there is, and the
    # sink is slower, so the tests insist on it.
    assert debezium._columns is not None, "the compiled reading (knowton_pipeline/lib/_columns.c) was not built"
    assert [t.name for t in COMPILED if debezium._compiled_spec(t) is not None] == [t.name for t in COMPILED]
    assert debezium._compiled_spec(table("Content")) is None  # text[] and jsonb are read with msgspec


def same_columns(a: ChangeColumns, b: ChangeColumns) -> bool:
    return (
        a.table is b.table
        and a.rows.equals(b.rows, check_metadata=True)
        and a.rows.schema == b.rows.schema
        and a.key_columns == b.key_columns
        and a.versions == b.versions
        and a.deletes == b.deletes
    )


def assert_compiled_agrees(synced: SyncedTable, records: Records) -> ChangeColumns | None:
    """The compiled reading is None or the msgspec reading's very result; returns it."""
    compiled = _read_compiled(synced, *unzip(records))
    if compiled is None:
        return None
    by_msgspec = _read_msgspec(synced, *unzip(records))
    assert by_msgspec is not None, "the compiled reading took a batch the msgspec reading refuses"
    assert same_columns(compiled, by_msgspec)
    return compiled


def test_a_real_event_from_the_stack_is_read_compiled() -> None:
    user = table("User")
    got = assert_compiled_agrees(user, [(REAL_KEY, REAL_VALUE)])
    assert got is not None
    assert got.rows.to_pylist()[0]["address"] == json.loads(REAL_VALUE)["after"]["address"]


@fuzz(50)
@given(batches(COMPILED))
def test_a_usual_batch_is_read_compiled_to_the_msgspec_columns(batch: tuple[SyncedTable, Records]) -> None:
    synced, records = batch
    assert assert_compiled_agrees(synced, records) is not None


def respelled(value: bytes, how: str, rng: random.Random) -> bytes:
    """The same event spelled another way JSON allows: escaped non-ASCII, fields in another order, whitespace."""
    event_ = json.loads(value)
    if how == "ascii":
        return json.dumps(event_, ensure_ascii=True).encode()
    if how == "order":

        def shuffled(obj: object) -> object:
            if isinstance(obj, dict):
                items = list(obj.items())
                rng.shuffle(items)
                return {k: shuffled(v) for k, v in items}
            return obj

        return json.dumps(shuffled(event_), ensure_ascii=False, separators=(",", ":")).encode()
    return json.dumps(event_, ensure_ascii=False, indent="\t").encode().replace(b"\n", b"\r\n")


@fuzz(40)
@given(batches(COMPILED), st.sampled_from(["ascii", "order", "whitespace"]), st.randoms(use_true_random=False))
def test_the_usual_batch_spelled_another_way_is_still_read_compiled(
    batch: tuple[SyncedTable, Records], how: str, rng: random.Random
) -> None:
    synced, records = batch
    spelled = [(key, respelled(value, how, rng)) for key, value in records]
    got = assert_compiled_agrees(synced, spelled)
    assert got is not None
    assert same_columns(got, _read_msgspec(synced, *unzip(records)))  # type: ignore[arg-type]


@fuzz(80)
@given(batches(COMPILED), st.data())
def test_a_batch_with_an_odd_record_is_read_compiled_only_to_the_msgspec_columns(
    batch: tuple[SyncedTable, Records], data: st.DataObject
) -> None:
    synced, records = batch
    i = data.draw(st.integers(0, len(records) - 1))
    key, value = records[i]
    records[i] = (key, odd(data.draw, value))
    event("read compiled" if assert_compiled_agrees(synced, records) is not None else "left to msgspec")


# Bytes that change what JSON means: structure, escapes, numbers, invalid UTF-8, control characters.
_BYTES = [b'"', b"\\", b"{", b"}", b"[", b"]", b":", b",", b" ", b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xc0\x80",
          b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\\u", b"\\ud800", b"\\udc00", b"\\u00e9", b"e", b".", b"-", b"0",
          b"9", b"n", b"null", b"true", b"1e400", b"x"]  # fmt: skip


@fuzz(150)
@given(batches(COMPILED), st.data())
def test_bytes_broken_anywhere_are_never_read_compiled_to_other_columns(
    batch: tuple[SyncedTable, Records], data: st.DataObject
) -> None:
    synced, records = batch
    i = data.draw(st.integers(0, len(records) - 1))
    key, value = records[i]
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(value)))
        cut = data.draw(st.integers(0, 2))
        value = value[:at] + data.draw(st.sampled_from(_BYTES)) + value[at + cut :]
    if key is not None and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(key)))
        key = key[:at] + data.draw(st.sampled_from(_BYTES)) + key[at + 1 :]
    records[i] = (key, value)
    event("read compiled" if assert_compiled_agrees(synced, records) is not None else "left to msgspec")


def test_a_record_the_compiled_reading_is_not_sure_of_goes_to_msgspec_and_is_still_read_as_columns() -> None:
    user = table("User")
    event_ = json.loads(REAL_VALUE)
    # A field name spelled with an escape is not guessed at; msgspec reads it, and the batch stays columnar.
    escaped = json.dumps(event_, separators=(",", ":")).replace('"after":', '"\\u0061fter":', 1).encode()
    records = [(REAL_KEY, REAL_VALUE), (REAL_KEY, escaped)]
    assert _read_compiled(user, *unzip(records)) is None
    got = read_change_columns(user, *unzip(records))
    assert got is not None and len(got) == 2


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda e: e["after"].pop("email"), id="a column missing from the new image"),
        pytest.param(lambda e: e["after"].update(username=None), id="null in a column that is not nullable"),
        pytest.param(lambda e: e["after"].update(reputation=2**31), id="an int out of range"),
        pytest.param(lambda e: e["after"].update(reputation=1.0), id="an int spelled as a float"),
        pytest.param(lambda e: e["after"].update(isVerified=1), id="a bool spelled as a number"),
        pytest.param(lambda e: e["source"].update(table="Users"), id="another table"),
        pytest.param(lambda e: e["source"].update(lsn=0), id="no positive lsn"),
        pytest.param(lambda e: e.update(op="t"), id="a truncate"),
        pytest.param(lambda e: e.update(before=e["after"], after=None, op="u"), id="an update without a new image"),
    ],
)
def test_a_record_msgspec_refuses_is_refused_compiled(change: object) -> None:
    user = table("User")
    event_ = json.loads(REAL_VALUE)
    change(event_)  # type: ignore[operator]
    records: Records = [(REAL_KEY, REAL_VALUE), (None, json.dumps(event_).encode())]
    assert _read_msgspec(user, *unzip(records)) is None
    assert _read_compiled(user, *unzip(records)) is None


def test_a_kafka_key_other_than_the_rows_is_refused_compiled() -> None:
    user = table("User")
    other = json.dumps({"address": json.loads(REAL_KEY)["address"] + "0"}).encode()
    assert _read_compiled(user, [other], [REAL_VALUE]) is None
    assert _read_compiled(user, [REAL_KEY], [REAL_VALUE]) is not None
    assert _read_compiled(user, [None], [REAL_VALUE]) is not None


def test_without_the_compiled_reading_a_batch_is_still_read_as_columns_and_the_log_says_why_slower(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    user = table("User")
    monkeypatch.setattr(debezium, "_columns", None)
    monkeypatch.setattr(debezium, "_COMPILED", {})
    with caplog.at_level(logging.WARNING, logger=debezium.__name__):
        got = read_change_columns(user, [REAL_KEY, None], [REAL_VALUE, REAL_VALUE])
        read_change_columns(user, [REAL_KEY], [REAL_VALUE])
    assert got is not None and len(got) == 2
    assert same_columns(got, _read_msgspec(user, [REAL_KEY, None], [REAL_VALUE, REAL_VALUE]))  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if "compiled reading" in r.getMessage()]
    assert said == [said[0]] and said[0].startswith("User: ") and "was not built" in said[0]  # once per table
