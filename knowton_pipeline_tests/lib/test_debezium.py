"""Decoding Debezium change events (`knowton_pipeline.lib.debezium`) without a server: round trips of nasty rows
for every catalog table, every kind of malformed record, and one real event from the stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.catalog import CDC_TABLES, Column, SyncedTable, UnknownTableError, table
from knowton_pipeline.lib.debezium import (
    ChangeEvent,
    MalformedEventError,
    _decode_timestamptz,
    _Refused,
    decode_event,
    decode_partial_row,
    decode_row,
    encode_row_like_debezium,
)
from knowton_pipeline.lib.transform import format_timestamp
from knowton_pipeline.lib.versions import MAX_VERSION, last_commit_lsn, sequence_position

# ---------------------------------------------------------------------------------------------------------------
# Strategies: nasty but valid rows for any catalog table (also used by test_transform).

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# numeric(p, s) precision is not in the catalog; these are the DDL's.
NUMERIC_PRECISION = {"price": 12, "amount": 20}

_CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
NASTY_TEXT = st.one_of(
    st.just(""),
    st.text(_CHARACTERS, max_size=12),
    st.sampled_from(["🚀 to the moon 🌙", "héllo 世界", "line\nbreak", 'quote " and \\ backslash', "a|b", " "]),
)
# Every generated string carries a marker, so a test can prove no row value leaks into an error message.
SECRET = "SECRET"
SECRET_TEXT = NASTY_TEXT.map(lambda s: SECRET + s)

TIMESTAMPS = st.one_of(
    st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2100, 12, 31, 23, 59, 59, 999_999),
        timezones=st.just(UTC),
    ),
    st.sampled_from(
        [
            EPOCH,
            datetime(2100, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            datetime(2026, 11, 24, 5, 5, 32, tzinfo=UTC),
            datetime(2026, 11, 24, 5, 5, 32, 100_000, tzinfo=UTC),
            datetime(1, 1, 1, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        ]
    ),
)


def decimals(scale: int, precision: int) -> st.SearchStrategy[Decimal]:
    """Decimals at exactly `scale` digits (trailing zeros kept), up to numeric(precision, scale)'s max."""
    largest = 10**precision - 1
    return st.one_of(
        st.integers(-largest, largest).map(lambda n: Decimal(n).scaleb(-scale)),
        st.sampled_from([0, 500, largest, -largest, 1, -1]).map(lambda n: Decimal(n).scaleb(-scale)),
        st.just(Decimal("-0").scaleb(-scale)),
    )


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=10,
    )


def column_values(column: Column, text: st.SearchStrategy[str] = NASTY_TEXT) -> st.SearchStrategy[Any]:
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "text": text,
        "int": st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -(2**31), 2**31 - 1])),
        "bigint": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -(2**63), 2**63 - 1])),
        "bool": st.booleans(),
        "numeric": decimals(column.scale or 0, NUMERIC_PRECISION.get(column.name, 18)),
        "timestamptz": TIMESTAMPS,
        "text[]": st.lists(text, max_size=4),
        "jsonb": json_values(text),
    }
    values = by_type[column.type]
    return st.none() | values if column.nullable else values


def rows(synced: SyncedTable, text: st.SearchStrategy[str] = NASTY_TEXT) -> st.SearchStrategy[dict[str, Any]]:
    """A Python-typed row of `synced`, keyed by PostgreSQL column name."""
    return st.fixed_dictionaries({c.name: column_values(c, text) for c in synced.columns})


def tables_and_rows(text: st.SearchStrategy[str] = NASTY_TEXT) -> st.SearchStrategy[tuple[SyncedTable, dict]]:
    return st.sampled_from(CDC_TABLES).flatmap(lambda t: st.tuples(st.just(t), rows(t, text)))


# Hand-written rows whose every string carries the marker.
FIXED_ROWS: dict[str, dict[str, Any]] = {
    "User": {
        "address": f"0x{SECRET}",
        "username": f"{SECRET}name",
        "email": f"{SECRET}@example.com",
        "bio": None,
        "avatarUrl": None,
        "reputation": 3,
        "isVerified": True,
        "createdAt": EPOCH,
        "updatedAt": EPOCH,
    },
    "Content": {
        "id": 9,
        "creator": f"0x{SECRET}",
        "title": f"{SECRET} title",
        "description": None,
        "category": f"{SECRET}music",
        "tags": [f"{SECRET}tag"],
        "price": Decimal("5.00"),
        "status": f"{SECRET}published",
        "metadata": {f"{SECRET}key": [f"{SECRET}value"]},
        "createdAt": EPOCH,
        "updatedAt": EPOCH,
    },
    "Purchase": {
        "id": 10,
        "contentId": 9,
        "buyer": f"0x{SECRET}",
        "amount": Decimal("1.500000"),
        "currency": f"{SECRET}ETH",
        "txHash": None,
        "status": f"{SECRET}completed",
        "createdAt": EPOCH,
        "updatedAt": EPOCH,
    },
    "heartbeat": {"id": 1, "ts": EPOCH},
}


# ---------------------------------------------------------------------------------------------------------------
# Building events the way the connector does.


def envelope(synced: SyncedTable, op: str, before: dict | None, after: dict | None, *, lsn: int, ts_ms: int) -> dict:
    return {
        "before": None if before is None else encode_row_like_debezium(synced, before),
        "after": None if after is None else encode_row_like_debezium(synced, after),
        "source": {
            "version": "3.6.1.Final",
            "connector": "postgresql",
            "name": "knowton",
            "ts_ms": ts_ms,
            "snapshot": "true" if op == "r" else "false",
            "db": "knowton",
            "sequence": f'[null,"{lsn}"]',
            "schema": synced.schema,
            "table": synced.name,
            "txId": 733,
            "lsn": lsn,
            "xmin": None,
        },
        "transaction": None,
        "op": op,
        "ts_ms": ts_ms + 2,
    }


def key_bytes(synced: SyncedTable, row: dict) -> bytes:
    encoded = encode_row_like_debezium(synced, row)
    return json.dumps({k: encoded[k] for k in synced.key}).encode()


def to_bytes(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


def same_scale(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """== on Decimal ignores scale (5.0 == 5.00); this does not."""
    return all(not isinstance(v, Decimal) or v.as_tuple().exponent == b[k].as_tuple().exponent for k, v in a.items())


# ---------------------------------------------------------------------------------------------------------------
# The real event


REAL_KEY = b'{"address":"0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}'
REAL_VALUE = (
    b'{"before":null,"after":{"address":"0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","username":"probe",'
    b'"email":null,"bio":null,"avatarUrl":null,"reputation":0,"isVerified":false,'
    b'"createdAt":"2026-11-24T05:05:32.487591Z","updatedAt":"2026-11-24T05:05:32.487591Z"},'
    b'"source":{"version":"3.6.1.Final","connector":"postgresql","name":"knowton","ts_ms":1795496732488,'
    b'"snapshot":"false","db":"knowton","sequence":"[null,\\"30897912\\"]","ts_us":1795496732488000,'
    b'"ts_ns":1795496732488000000,"schema":"public","table":"User","txId":733,"lsn":30897912,"xmin":null},'
    b'"transaction":null,"op":"c","ts_ms":1795496732490,"ts_us":1795496732490123,"ts_ns":1795496732490123456}'
)


def test_real_insert_event_from_the_stack_decodes_to_typed_row() -> None:
    event = decode_event("cdc-User", REAL_KEY, REAL_VALUE)
    assert event is not None
    created = datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC)
    assert event.table is table("User")
    assert (event.op, event.lsn, event.ts_ms, event.before, event.is_delete) == (
        "c",
        30897912,
        1795496732488,
        None,
        False,
    )
    assert event.key == ("0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",)
    assert (
        event.row
        == event.after
        == {
            "address": "0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "username": "probe",
            "email": None,
            "bio": None,
            "avatarUrl": None,
            "reputation": 0,
            "isVerified": False,
            "createdAt": created,
            "updatedAt": created,
        }
    )
    assert event.row["createdAt"].tzinfo is UTC


def test_tombstone_after_a_delete_decodes_to_none() -> None:
    assert decode_event("cdc-User", REAL_KEY, None) is None


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@given(tables_and_rows())
def test_decode_row_inverts_encode_row_like_debezium_for_every_table(table_and_row: tuple[SyncedTable, dict]) -> None:
    synced, row = table_and_row
    decoded = decode_row(synced, json.loads(json.dumps(encode_row_like_debezium(synced, row))))
    assert decoded == row
    assert list(decoded) == [c.name for c in synced.columns]
    for column in synced.columns:
        value = decoded[column.name]
        if value is None:
            continue
        if column.type == "numeric":
            assert value.as_tuple().exponent == -(column.scale or 0)
            assert not (value.is_zero() and value.is_signed()), "PostgreSQL numeric has no negative zero"
        if column.type == "timestamptz":
            assert value.tzinfo is UTC


@given(
    tables_and_rows(),
    st.sampled_from(["c", "u", "d", "r"]),
    st.integers(1, 2**63 - 1),
    st.integers(0, 2**42),
    st.data(),
)
def test_decode_event_gives_op_key_lsn_and_row_images(
    table_and_row: tuple[SyncedTable, dict], op: str, lsn: int, ts_ms: int, data: st.DataObject
) -> None:
    synced, row = table_and_row
    # An update keeps its key: Debezium turns a key change into a delete and a create.
    other = {**data.draw(rows(synced)), **{k: row[k] for k in synced.key}}
    before, after = {"c": (None, row), "r": (None, row), "u": (other, row), "d": (row, None)}[op]
    value = to_bytes(envelope(synced, op, before, after, lsn=lsn, ts_ms=ts_ms))

    event = decode_event(synced.topic, key_bytes(synced, row), value)

    assert event is not None
    assert (event.table, event.op, event.lsn, event.ts_ms) == (synced, op, lsn, ts_ms)
    assert event.key == tuple(row[k] for k in synced.key)
    assert event.before == before and event.after == after
    # A delete leaves behind only its key; the stores need nothing else to apply it.
    left = {k: row[k] for k in synced.key} if op == "d" else row
    assert event.row == left and event.is_delete == (op == "d")
    assert same_scale(event.row, left)
    assert decode_event(synced.topic, None, value) == event


@given(tables_and_rows(), st.data())
def test_an_old_image_sharing_columns_with_the_new_decodes_as_it_does_alone(
    table_and_row: tuple[SyncedTable, dict], data: st.DataObject
) -> None:
    synced, row = table_and_row
    # The old image takes some columns from the new row and the rest from another one: the unchanged columns
    # reuse the new image's decoded values, and the result must be what decoding the old image alone gives.
    other = data.draw(rows(synced))
    kept = data.draw(st.sets(st.sampled_from([c.name for c in synced.columns])))
    before = {c.name: (row if c.name in kept else other)[c.name] for c in synced.columns}
    raw_before = json.loads(json.dumps(encode_row_like_debezium(synced, before)))
    raw_after = json.loads(json.dumps(encode_row_like_debezium(synced, row)))

    shared = decode_partial_row(synced, raw_before, new=(raw_after, decode_row(synced, raw_after)))

    assert shared == decode_partial_row(synced, raw_before) == before
    assert same_scale(shared, before)


@given(rows(table("User")))
def test_columns_unknown_to_the_catalog_are_ignored(row: dict) -> None:
    raw = {**encode_row_like_debezium(table("User"), row), "newColumn": "SECRET", "anotherOne": None}
    assert decode_row(table("User"), raw) == row


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("2026-11-24T05:05:32Z", datetime(2026, 11, 24, 5, 5, 32, tzinfo=UTC)),
        ("2026-11-24T05:05:32.4Z", datetime(2026, 11, 24, 5, 5, 32, 400_000, tzinfo=UTC)),
        ("2026-11-24T05:05:32.487591Z", datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC)),
        ("2026-11-24T05:05:32.487591000Z", datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC)),
        ("2026-11-24T05:05:32.000000000Z", datetime(2026, 11, 24, 5, 5, 32, tzinfo=UTC)),
        ("2026-11-24T05:05:32.487591+00:00", datetime(2026, 11, 24, 5, 5, 32, 487_591, tzinfo=UTC)),
        ("2026-11-24T07:35:32.5+02:30", datetime(2026, 11, 24, 5, 5, 32, 500_000, tzinfo=UTC)),
        ("1969-12-31T23:00:00-01:00", EPOCH),
    ],
)
def test_every_debezium_timestamp_spelling_decodes_to_the_same_utc_instant(spelling: str, expected: datetime) -> None:
    row = decode_row(table("heartbeat"), {"id": 1, "ts": spelling})
    assert row["ts"] == expected and row["ts"].tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "scale", "expected"),
    [
        ("5", 2, "5.00"),
        ("5.1", 2, "5.10"),
        ("5.00", 2, "5.00"),
        ("5.000000", 2, "5.00"),
        ("-0.00", 2, "0.00"),
        ("99999999999999.999999", 6, "99999999999999.999999"),
        ("1E+3", 2, "1000.00"),
    ],
)
def test_numeric_strings_decode_to_exact_decimals_at_the_column_scale(text: str, scale: int, expected: str) -> None:
    synced = table("Content") if scale == 2 else table("Purchase")
    column = "price" if scale == 2 else "amount"
    good = encode_row_like_debezium(synced, FIXED_ROWS[synced.name])
    decoded = decode_row(synced, {**good, column: text})[column]
    assert str(decoded) == expected


# ---------------------------------------------------------------------------------------------------------------
# Malformed rows: every bad value names its column and never shows a value.

BAD_VALUES: dict[str, list[Any]] = {
    "text": [5, True, 1.5, [SECRET], {SECRET: SECRET}],
    "int": [f"{SECRET}7", True, 7.0, 2**31, -(2**31) - 1, [7]],
    "bigint": [f"{SECRET}7", False, 7.5, 2**63, -(2**63) - 1],
    "bool": [f"{SECRET}true", "true", 1, 0],
    "numeric": [
        5.0,
        5,
        SECRET,
        "NaN",
        "Infinity",
        "-Infinity",
        "1.0000001",
        "1e999999999",
        "5_00",
        " 5.00",
        f"5.00{SECRET}",
    ],
    "timestamptz": [
        SECRET,
        1795496732488,
        "2026-11-24 05:05:32Z",
        "2026-11-24T05:05:32",
        "2026-02-30T00:00:00Z",
        "2026-11-24T05:05:32.4875911Z",
        "2026-11-24T05:05:32.000000001Z",
        "infinity",
        "+10000-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        f"2026-11-24T05:05:32Z{SECRET}",
    ],
    "text[]": [SECRET, [SECRET, 5], [SECRET, None], [[SECRET]], {SECRET: 1}],
    "jsonb": [{SECRET: 1}, [SECRET], 5, "{" + SECRET, "NaN", '{"' + SECRET + '": Infinity}', "1e400", ""],
}
COLUMNS = [(t, c) for t in CDC_TABLES for c in t.columns]
COLUMN_IDS = [f"{t.name}.{c.name}" for t, c in COLUMNS]


def assert_safe_message(error: Exception, *must_mention: str) -> None:
    message = str(error)
    for needle in must_mention:
        assert needle in message, message
    assert SECRET not in message, message


def assert_refused(synced: SyncedTable, column: Column, row: dict[str, Any], bad: Any) -> None:
    event = envelope(synced, "c", None, row, lsn=42, ts_ms=1)
    event["after"][column.name] = bad
    with pytest.raises(MalformedEventError) as err:
        decode_event(synced.topic, key_bytes(synced, row), to_bytes(event))
    assert_safe_message(err.value, f"{synced.name}.{column.name}")
    assert err.value.column == column.name


@pytest.mark.parametrize(("synced", "column"), COLUMNS, ids=COLUMN_IDS)
def test_every_wrong_type_or_lossy_value_is_malformed_and_named_without_its_value(
    synced: SyncedTable, column: Column
) -> None:
    for bad in BAD_VALUES[column.type]:
        assert_refused(synced, column, FIXED_ROWS[synced.name], bad)


@given(st.sampled_from(COLUMNS), st.data())
def test_a_bad_value_in_a_nasty_row_never_leaks_the_row_into_the_message(
    table_and_column: tuple[SyncedTable, Column], data: st.DataObject
) -> None:
    synced, column = table_and_column
    assert_refused(
        synced, column, data.draw(rows(synced, SECRET_TEXT)), data.draw(st.sampled_from(BAD_VALUES[column.type]))
    )


@pytest.mark.parametrize(("synced", "column"), COLUMNS, ids=COLUMN_IDS)
def test_a_missing_column_or_a_null_in_a_not_null_column_is_malformed(synced: SyncedTable, column: Column) -> None:
    raw = encode_row_like_debezium(synced, FIXED_ROWS[synced.name])
    missing = {k: v for k, v in raw.items() if k != column.name}
    with pytest.raises(MalformedEventError) as err:
        decode_row(synced, missing)
    assert_safe_message(err.value, f"{synced.name}.{column.name}", "missing")
    if column.nullable:
        assert decode_row(synced, {**raw, column.name: None})[column.name] is None
    else:
        with pytest.raises(MalformedEventError) as err:
            decode_row(synced, {**raw, column.name: None})
        assert_safe_message(err.value, f"{synced.name}.{column.name}", "NOT NULL")


def test_jsonb_and_text_arrays_are_not_null_in_this_schema() -> None:
    # The neutral values of the transform and the refusal above rely on it.
    for synced in CDC_TABLES:
        for column in synced.columns:
            if column.type in ("jsonb", "text[]"):
                assert not column.nullable, f"{synced.name}.{column.name}"


# ---------------------------------------------------------------------------------------------------------------
# Malformed envelopes


def _user_event(op: str = "u") -> dict:
    user = table("User")
    row = FIXED_ROWS["User"]
    return envelope(user, op, row if op in ("u", "d") else None, None if op == "d" else row, lsn=77, ts_ms=5)


def _set(path: str, value: Any, op: str = "u") -> Callable[[], dict]:
    def build() -> dict:
        event = _user_event(op)
        *parents, last = path.split(".")
        target = event
        for part in parents:
            target = target[part]
        target[last] = value
        return event

    return build


def _drop(path: str) -> Callable[[], dict]:
    def build() -> dict:
        event = _user_event()
        *parents, last = path.split(".")
        target = event
        for part in parents:
            target = target[part]
        del target[last]
        return event

    return build


MALFORMED_ENVELOPES: dict[str, tuple[Callable[[], dict | bytes], str]] = {
    "value is not JSON": (lambda: b'{"op": "c", ' + SECRET.encode(), "JSON"),
    "value is not UTF-8": (lambda: b"\xff\xfe" + SECRET.encode(), "JSON"),
    "value is an array": (lambda: b"[]", "object"),
    "value is a string": (lambda: json.dumps(SECRET).encode(), "object"),
    "schemas.enable=true envelope": (lambda: {"schema": {}, "payload": _user_event()}, "schemas.enable=false"),
    "op missing": (_drop("op"), "op"),
    "op unknown": (_set("op", "x"), "op"),
    "op is a number": (_set("op", 5), "op"),
    "op is a long secret": (_set("op", SECRET * 3), "op"),
    "source missing": (_drop("source"), "source"),
    "source is a string": (_set("source", SECRET), "source"),
    "lsn missing": (_drop("source.lsn"), "source.lsn"),
    "lsn zero": (_set("source.lsn", 0), "source.lsn"),
    "lsn negative": (_set("source.lsn", -5), "source.lsn"),
    "lsn as string": (_set("source.lsn", "30897912"), "source.lsn"),
    "lsn as bool": (_set("source.lsn", True), "source.lsn"),
    "lsn as float": (_set("source.lsn", 1.5), "source.lsn"),
    "source.table of another table": (_set("source.table", "Content"), "source.table"),
    "source.table missing": (_drop("source.table"), "source.table"),
    "source.table is not an identifier": (_set("source.table", SECRET + " x"), "source.table"),
    "ts_ms not a number": (_set("source.ts_ms", "soon"), "ts_ms"),
    "update without after": (_set("after", None), "after"),
    "create without after": (_set("after", None, op="c"), "after"),
    "read without after": (_set("after", None, op="r"), "after"),
    "delete with an after": (_set("after", {"address": SECRET}, op="d"), "after"),
    "after is a string": (_set("after", SECRET), "User"),
    "delete whose before is a list": (_set("before", [SECRET], op="d"), "before"),
}


@pytest.mark.parametrize("case", list(MALFORMED_ENVELOPES))
def test_a_malformed_envelope_is_refused_naming_the_field(case: str) -> None:
    build, field = MALFORMED_ENVELOPES[case]
    built = build()
    value = built if isinstance(built, bytes) else to_bytes(built)
    with pytest.raises(MalformedEventError) as err:
        decode_event("cdc-User", key_bytes(table("User"), FIXED_ROWS["User"]), value)
    assert_safe_message(err.value, field)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (json.dumps({"address": "0xsomeone-else"}).encode(), "address"),
        (json.dumps({"address": f"0x{SECRET}", "extra": 1}).encode(), None),
        (json.dumps({"wallet": f"0x{SECRET}"}).encode(), "User.address"),
        (json.dumps({"address": None}).encode(), "User.address"),
        (json.dumps({"address": 5}).encode(), "User.address"),
        (json.dumps([f"0x{SECRET}"]).encode(), "key"),
        (b"null", "key"),
        (b"", "key"),
        (SECRET.encode(), "key"),
    ],
)
def test_a_kafka_key_that_disagrees_with_the_row_is_malformed(key: bytes, field: str | None) -> None:
    value = to_bytes(_user_event("c"))
    if field is None:
        # Extra key fields are harmless: only the catalog's key columns are compared.
        event = decode_event("cdc-User", key, value)
        assert event is not None and event.key == (f"0x{SECRET}",)
        return
    with pytest.raises(MalformedEventError) as err:
        decode_event("cdc-User", key, value)
    assert_safe_message(err.value, field)


def test_a_delete_is_keyed_by_its_before_image() -> None:
    user = table("User")
    row = FIXED_ROWS["User"]
    event = decode_event("cdc-User", key_bytes(user, row), to_bytes(_user_event("d")))
    assert event is not None and event.is_delete
    assert event.after is None and event.before == row and event.row == {"address": row["address"]}
    assert event.key == (row["address"],)


def _with_user_before(op: str, before: object) -> bytes:
    value = _user_event(op)
    value["before"] = before
    return to_bytes(value)


@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "not a number"]), st.sampled_from(["infinity", "-infinity"]))
def test_a_delete_applies_from_its_key_whatever_its_old_values(price: str, stamp: str) -> None:
    content = table("Content")
    row = FIXED_ROWS["Content"]
    raw = {**encode_row_like_debezium(content, row), "price": price, "createdAt": stamp, "tags": ["a", None]}
    value = {**envelope(content, "d", row, None, lsn=5, ts_ms=1), "before": raw}
    event = decode_event("cdc-Content", key_bytes(content, row), to_bytes(value))
    assert event is not None and event.is_delete and event.key == (row["id"],)
    assert event.row == {"id": row["id"]}
    # The values that decode are kept for the enrichment; the refused ones are left out, not guessed.
    assert event.before is not None and "price" not in event.before and "tags" not in event.before
    assert event.before["creator"] == row["creator"]


def test_an_update_applies_from_its_after_image_whatever_its_old_values() -> None:
    content = table("Content")
    row = FIXED_ROWS["Content"]
    value = envelope(content, "u", row, row, lsn=5, ts_ms=1)
    value["before"]["price"] = "NaN"
    event = decode_event("cdc-Content", key_bytes(content, row), to_bytes(value))
    assert event is not None and event.after == row and event.row == row
    assert event.before is not None and "price" not in event.before


def test_a_key_only_delete_of_replica_identity_default_applies() -> None:
    user = table("User")
    row = FIXED_ROWS["User"]
    key_only = {c.name: (row[c.name] if c.name in user.key else None) for c in user.columns}
    event = decode_event("cdc-User", key_bytes(user, row), _with_user_before("d", key_only))
    assert event is not None and event.is_delete and event.key == (row["address"],)
    # No old image at all: the Kafka key is enough.
    event = decode_event("cdc-User", key_bytes(user, row), _with_user_before("d", None))
    assert event is not None and event.key == (row["address"],) and event.row == {"address": row["address"]}
    with pytest.raises(MalformedEventError, match="key"):
        decode_event("cdc-User", None, _with_user_before("d", None))


def test_a_truncate_decodes_to_an_event_without_key_or_images() -> None:
    value = {"op": "t", "before": None, "after": None, "source": {"lsn": 99, "ts_ms": 7, "table": "Purchase"}}
    event = decode_event("cdc-Purchase", None, to_bytes(value))
    assert event is not None and event.is_truncate and not event.is_delete
    assert (event.key, event.before, event.after, event.lsn) == ((), None, None, 99)
    assert event.row == {}


@pytest.mark.parametrize("topic", ["cdc-Nope", "User", "dlq-parked", "cdc-user", "", "cdc-", "knowton.public.User"])
def test_a_topic_that_is_not_cdc_plus_a_catalog_table_is_an_unknown_table(topic: str) -> None:
    with pytest.raises(UnknownTableError):
        decode_event(topic, REAL_KEY, REAL_VALUE)
    with pytest.raises(KeyError):
        decode_event(topic, REAL_KEY, None)


def test_heartbeat_events_decode_like_a_table() -> None:
    heartbeat = table("heartbeat")
    row = {"id": 1, "ts": datetime(2026, 11, 24, 5, 5, 32, 1, tzinfo=UTC)}
    event = decode_event("cdc-heartbeat", b'{"id":1}', to_bytes(envelope(heartbeat, "u", row, row, lsn=9, ts_ms=3)))
    assert event is not None and event.key == (1,) and event.row == row


def test_jsonb_arrives_as_text_and_decodes_to_nested_values() -> None:
    content = table("Content")
    raw = encode_row_like_debezium(content, FIXED_ROWS["Content"])
    raw["metadata"] = '{"b": {"z": [1, 2.5, null, true, "é🚀"]}, "a": {}}'
    assert decode_row(content, raw)["metadata"] == {"b": {"z": [1, 2.5, None, True, "é🚀"]}, "a": {}}
    raw["metadata"] = '"just a string"'
    assert decode_row(content, raw)["metadata"] == "just a string"


def test_encoding_refuses_floats_and_naive_timestamps() -> None:
    content = table("Content")
    with pytest.raises(ValueError, match=r"Content\.price"):
        encode_row_like_debezium(content, {**FIXED_ROWS["Content"], "price": 5.1})
    with pytest.raises(ValueError, match=r"Content\.createdAt"):
        encode_row_like_debezium(content, {**FIXED_ROWS["Content"], "createdAt": datetime(2026, 1, 1)})


def test_change_event_refuses_an_op_without_its_row_image() -> None:
    with pytest.raises(ValueError):
        ChangeEvent(table=table("heartbeat"), op="c", key=(1,), before=None, after=None, lsn=1, ts_ms=0)
    with pytest.raises(ValueError):
        ChangeEvent(table=table("heartbeat"), op="t", key=(1,), before=None, after=None, lsn=1, ts_ms=0)
    with pytest.raises(ValueError):
        ChangeEvent(table=table("heartbeat"), op="d", key=(), before=None, after=None, lsn=1, ts_ms=0)
    with pytest.raises(ValueError):
        ChangeEvent(table=table("heartbeat"), op="x", key=(1,), before=None, after={"id": 1}, lsn=1, ts_ms=0)


@given(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)))
def test_the_fast_timestamp_path_reads_debeziums_usual_form_as_the_full_parser_does(moment: datetime) -> None:
    usual = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # what Debezium sends: the fast path
    with_offset = moment.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")  # the same instant: the full parser
    assert len(usual) == 27
    assert _decode_timestamptz(usual) == _decode_timestamptz(with_offset) == moment
    assert _decode_timestamptz(usual).tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "2025-03-01T12:00:00,123456Z",
        "2025-13-01T12:00:00.123456Z",
        "2025-03-01 12:00:00.123456Z",
        "2025-03-01T12:00:60.123456Z",
    ],
)
def test_a_timestamp_of_the_usual_length_but_not_its_form_is_refused(text: str) -> None:
    with pytest.raises(_Refused):
        _decode_timestamptz(text)


# The usual `source.sequence` is read without a JSON parser; any spelling must read as the JSON reading gives, which
# the same array spelled with spaces always takes.
_LSN_PART = st.one_of(
    st.integers(min_value=-5, max_value=2**64).map(lambda n: f'"{n}"'),
    st.integers(min_value=0, max_value=2**64).map(str),
    st.text(alphabet="0123456789", min_size=0, max_size=22).map(lambda d: f'"{d}"'),
    st.sampled_from(["null", "true", '"1.5"', '"\u0663"', '" 7"', '"+7"', '"1","2"']),
)


@given(_LSN_PART, _LSN_PART)
def test_a_sequence_is_read_as_its_json_says(first: str, second: str) -> None:
    usual, spaced = f"[{first},{second}]", f"[ {first} , {second} ]"
    assert last_commit_lsn(usual) == last_commit_lsn(spaced)
    assert sequence_position(usual) == sequence_position(spaced)
    if first.strip('"').isdigit() and second.strip('"').isdigit() and first[0] == second[0] == '"':
        values = int(first.strip('"')), int(second.strip('"'))
        expected = values[0] if 0 < values[0] <= MAX_VERSION else None
        assert last_commit_lsn(usual) == expected


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-9, minutes=-30))])))
def test_a_timestamp_is_spelled_in_utc_with_six_fraction_digits(value: datetime) -> None:
    try:
        u = value.astimezone(UTC)
    except OverflowError:  # moved to UTC, it leaves the years datetime can hold
        return
    expected = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"
    assert format_timestamp(value) == expected
