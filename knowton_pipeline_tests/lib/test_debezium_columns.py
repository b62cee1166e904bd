"""A batch read as columns (`debezium.read_change_columns`) against the same records decoded one by one
(`decode_event`): a batch taken as columns holds, change by change, the row, key, version and delete flag the
event-by-event decoding gives; the usual batches of every table without jsonb are taken. Pure: no stack."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from knowton_pipeline.catalog import CDC_TABLES, SyncedTable, table
from knowton_pipeline.lib.debezium import ChangeColumns, MalformedEventError, decode_event, read_change_columns
from knowton_pipeline.lib.sync.apply import below_truncate, mirror_items
from knowton_pipeline.lib.transform import clickhouse_block, clickhouse_columns, to_clickhouse_row
from knowton_pipeline.lib.versions import stream_version, stream_versions
from knowton_pipeline_tests.lib.test_debezium_fast import ODD_VALUES, usual_records

COLUMNAR = [t for t in CDC_TABLES if all(c.type != "jsonb" for c in t.columns)]


def unzip(records: list[tuple[bytes | None, bytes]]) -> tuple[list[bytes | None], list[bytes]]:
    return [k for k, _ in records], [v for _, v in records]


def change_rows(columns: ChangeColumns) -> list[dict[str, Any]]:
    return columns.rows.to_pylist()


def same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal, and every Decimal at the same scale (== on Decimal ignores 5.0 against 5.00)."""
    scale = {k: v.as_tuple().exponent for k, v in a.items() if isinstance(v, Decimal)}
    return a == b and scale == {k: v.as_tuple().exponent for k, v in b.items() if isinstance(v, Decimal)}


def assert_same_as_one_by_one(
    synced: SyncedTable, records: list[tuple[bytes | None, bytes]], got: ChangeColumns
) -> None:
    rows = change_rows(got)
    assert len(got) == len(records) == len(rows)
    for i, (key, value) in enumerate(records):
        one = decode_event(synced.topic, key, value)
        assert one is not None
        expected = dict.fromkeys((c.name for c in synced.columns), None) | one.row if one.is_delete else one.row
        assert same_values(rows[i], expected)
        assert got.keys[i] == one.key
        assert got.versions[i] == one.version
        assert got.deletes[i] == one.is_delete


@st.composite
def batches(draw: st.DrawFn, tables: list[SyncedTable]) -> tuple[SyncedTable, list[tuple[bytes | None, bytes]]]:
    synced = draw(st.sampled_from(tables))
    records = []
    for _ in range(draw(st.integers(1, 6))):
        _, key, value = draw(usual_records(synced))
        records.append((None if draw(st.integers(0, 5)) == 0 else key, value))
    return synced, records


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(COLUMNAR))
def test_a_usual_batch_is_read_as_columns_holding_what_decoding_one_by_one_gives(
    batch: tuple[SyncedTable, list[tuple[bytes | None, bytes]]],
) -> None:
    synced, records = batch
    got = read_change_columns(synced, *unzip(records))
    assert got is not None
    assert_same_as_one_by_one(synced, records, got)


def test_a_table_with_jsonb_is_never_read_as_columns() -> None:
    content = table("Content")
    assert any(c.type == "jsonb" for c in content.columns)
    assert read_change_columns(content, [], []) is None


def odd(draw: st.DrawFn, value: bytes) -> bytes:
    event = json.loads(value)
    where = draw(st.sampled_from(["top", "source", "before", "after"]))
    holder = event if where == "top" else event.get(where)
    if not isinstance(holder, dict):
        event[where] = draw(ODD_VALUES)
    else:
        name = draw(st.sampled_from([*sorted(holder), "extra"]))
        if draw(st.integers(0, 4)) == 0:
            holder.pop(name, None)
        else:
            holder[name] = draw(ODD_VALUES | st.just(None))
    return json.dumps(event, ensure_ascii=False).encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(COLUMNAR), st.data())
def test_a_batch_with_an_odd_record_is_read_as_columns_only_as_decoding_one_by_one_reads_it(
    batch: tuple[SyncedTable, list[tuple[bytes | None, bytes]]], data: st.DataObject
) -> None:
    synced, records = batch
    i = data.draw(st.integers(0, len(records) - 1))
    key, value = records[i]
    records[i] = (key, odd(data.draw, value))
    got = read_change_columns(synced, *unzip(records))
    if got is None:
        event("left to the event-by-event decoding")
        return
    event("read as columns")
    try:
        assert_same_as_one_by_one(synced, records, got)
    except MalformedEventError as exc:
        raise AssertionError(f"the columns took a record decoding one by one refuses: {exc}") from exc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(COLUMNAR), st.one_of(st.just(0), st.integers(1, 2**62)))
def test_the_block_of_a_batch_holds_the_rows_the_row_by_row_way_writes(
    batch: tuple[SyncedTable, list[tuple[bytes | None, bytes]]], truncated_at: int
) -> None:
    synced, records = batch
    changes = read_change_columns(synced, *unzip(records))
    assert changes is not None
    block = clickhouse_block(changes, tombstones_below=truncated_at)
    events = [(decode_event(synced.topic, key, value), i) for i, (key, value) in enumerate(records)]
    items = [below_truncate(item, {synced.name: truncated_at}) for item in mirror_items(events)]  # type: ignore[arg-type]
    expected = {
        tuple(item.row[k] for k in synced.key): to_clickhouse_row(
            synced, item.row, version=item.version, deleted=item.deleted
        )
        for item in items
    }
    names = clickhouse_columns(synced)
    assert block.column_names == names
    got = {}
    for row in block.to_pylist():
        values = [row[n] for n in names]
        got[tuple(row[synced.column(k).target_name] for k in synced.key)] = values
    assert got.keys() == expected.keys()
    for key, values in got.items():
        assert values == expected[key]
        assert [v.as_tuple().exponent for v in values if isinstance(v, Decimal)] == [
            v.as_tuple().exponent for v in expected[key] if isinstance(v, Decimal)
        ]


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["c", "u", "d", "r"]),
            st.integers(1, 2**63 - 1),
            st.one_of(
                st.none(),
                st.integers(0, 2**64).map(lambda n: f'["{n}","{n + 7}"]'),
                st.integers(0, 2**63).map(lambda n: f'[null,"{n}"]'),
                st.integers(0, 10**18).map(lambda n: f'[null,"{n}"]'),
                st.integers(0, 10**18).map(lambda n: f'["{n}","{n + 7}"]'),
                st.tuples(st.integers(-5, 2**64), st.integers(-5, 2**64)).map(
                    lambda p: json.dumps([str(p[0]), str(p[1])])
                ),
                st.text(max_size=12),
                st.integers(),
            ),
        ),
        max_size=8,
    )
)
def test_the_versions_of_a_batch_are_each_changes_own(changes: list[tuple[str, int, Any]]) -> None:
    ops, lsns, sequences = (list(part) for part in zip(*changes, strict=True)) if changes else ([], [], [])
    assert stream_versions(ops, lsns, sequences) == [stream_version(*c) for c in changes]
