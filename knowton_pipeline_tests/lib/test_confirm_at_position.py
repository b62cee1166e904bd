"""Confirming drift at a known position (pure logic, property-based): the re-check rule, the pieces read from Kafka,
and the re-check loop driven by a simulated target that applies past positions as told."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.reconcile.applied import Applied, PositionUnknownError, applied_all, record_lsn
from knowton_pipeline.lib.reconcile.bisect import Differences, Key
from knowton_pipeline.lib.reconcile.engine import Pair, ReconcileOptions, Reconciler, recheck
from knowton_pipeline.lib.stores import target_store

row = st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))
pair = st.tuples(row, row)


@given(pair, pair, st.booleans())
def test_a_key_that_matches_now_was_in_flight(before: Pair, now: Pair, applied: bool) -> None:
    if now[0] == now[1]:
        assert recheck(before, now, applied=applied) == "settled"
    else:
        assert recheck(before, now, applied=applied) != "settled"


@given(pair, pair)
def test_past_the_position_an_unchanged_source_the_target_still_differs_from_is_drift(before: Pair, now: Pair) -> None:
    if now[0] != now[1]:
        expected = "drift" if now[0] == before[0] else "moved"
        assert recheck(before, now, applied=True) == expected


@given(pair, pair)
def test_after_a_fixed_wait_only_a_key_neither_side_moved_is_drift(before: Pair, now: Pair) -> None:
    if now[0] != now[1]:
        assert recheck(before, now, applied=False) == ("drift" if now == before else "moved")


@given(st.integers(1, 2**63 - 1), st.sampled_from(["c", "u", "r"]))
def test_the_source_lsn_of_a_debezium_event_is_read(lsn: int, op: str) -> None:
    value = orjson.dumps({"before": None, "after": {"id": 1}, "source": {"lsn": lsn, "sequence": None}, "op": op})
    assert record_lsn(value) == lsn


@given(st.one_of(st.none(), st.binary(max_size=40), st.just(b"{}"), st.just(b'{"source": {"lsn": "12"}}')))
def test_a_record_without_a_usable_lsn_reads_as_none(value: bytes | None) -> None:
    assert record_lsn(value) is None or b'"lsn"' in (value or b"")


partitions = st.lists(st.tuples(st.sampled_from(["cdc-User", "cdc-Content"]), st.integers(0, 2)), unique=True)


@given(partitions, st.data())
def test_a_group_has_applied_all_once_every_partition_reaches_its_end(
    parts: list[tuple[str, int]], data: st.DataObject
) -> None:
    ends = {p: data.draw(st.integers(0, 1000)) for p in parts}
    positions = {p: data.draw(st.integers(0, 1000)) for p in parts if data.draw(st.booleans())}
    expected = all(positions.get(p, 0) >= end for p, end in ends.items())
    assert applied_all(positions, ends) is expected
    # Moving on never un-applies: positions only grow.
    if expected:
        assert applied_all({p: o + 1 for p, o in positions.items()}, ends)


# --- the re-check loop, against a simulated pipeline --------------------------------------------------------------


class FakeWatch:
    """A target that applies past each anchored position after `delay` polls (never when `delay` is None)."""

    def __init__(self, pipeline: Pipeline, delay: int | None, unknown: bool = False):
        self.pipeline, self.delay, self.unknown = pipeline, delay, unknown
        self.anchors = 0

    def anchor(self) -> int:
        self.anchors += 1
        return self.anchors

    def wait(self, position: int, deadline: float, on_wait: Callable[[float], None]) -> Applied:
        if self.unknown:
            raise PositionUnknownError("no sink group")
        if self.delay is None:
            return "behind"
        for _ in range(self.delay):
            on_wait(0.0)
        self.pipeline.apply()
        return "applied"

    def close(self) -> None:
        pass


class Pipeline:
    """Source and target rows by key; `apply` brings the target to the source, except for drifted keys."""

    def __init__(self, source: dict[Key, str], target: dict[Key, str], drifted: set[Key], moving: set[Key]):
        self.source, self.target, self.drifted, self.moving = source, target, drifted, moving
        self.step = 0

    def apply(self) -> None:
        for key, value in self.source.items():
            if key not in self.drifted:
                self.target[key] = value
        self.step += 1
        for key in self.moving:  # a busy key: its source changes again after every apply
            self.source[key] = f"v{self.step}"


class FakeSide:
    max_parts = 16

    def __init__(self, rows: dict[Key, str]):
        self.rows = rows

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        return {k: self.rows[k] for k in keys if k in self.rows}


def settle(pipeline: Pipeline, watch: Any, **options: Any) -> tuple[Differences, list[Key], dict[Key, float], int, str]:
    store = target_store("clickhouse")
    opts = ReconcileOptions(**{"settle_seconds": 0.001, "stuck_seconds": 0.0, **options})
    reconciler = Reconciler(
        table("User"), store, FakeSide(pipeline.source), FakeSide(pipeline.target), opts, watch=watch
    )  # type: ignore[arg-type]
    first = reconciler._compare(pipeline.source, pipeline.target)
    diffs, in_flight, lagging, unchecked = reconciler._settle(first)
    return diffs, in_flight, lagging, unchecked, reconciler.confirmed_by


keys = st.lists(st.text("abcdef", min_size=1, max_size=4), unique=True, max_size=12)


@settings(max_examples=60, deadline=None)
@given(keys, st.data())
def test_past_the_position_drift_is_confirmed_and_in_flight_rows_are_never_reported(
    names: list[str], data: st.DataObject
) -> None:
    kinds = {k: data.draw(st.sampled_from(["equal", "in flight", "drift", "busy"])) for k in names}
    source = {k: "s" for k in names}
    target = {k: ("s" if kind == "equal" else "old") for k, kind in kinds.items()}
    drifted = {k for k, kind in kinds.items() if kind == "drift"}
    busy = {k for k, kind in kinds.items() if kind == "busy"}
    pipeline = Pipeline(source, target, drifted, busy)
    watch = FakeWatch(pipeline, delay=data.draw(st.integers(0, 3)))
    diffs, in_flight, lagging, _, confirmed_by = settle(pipeline, watch, stuck_seconds=3600.0)
    reported = {*diffs.missing_in_target, *diffs.extra_in_target, *diffs.different}
    assert reported == drifted
    assert not lagging
    assert set(in_flight) == busy  # a busy key whose target keeps up stays in flight, unreported
    if reported or in_flight:
        assert confirmed_by == "position"
    if not busy and drifted:
        assert watch.anchors == 1  # an idle pipeline confirms in one round


@given(keys.filter(bool))
def test_a_target_that_never_applies_past_the_position_reports_its_differences_as_lagging(names: list[str]) -> None:
    pipeline = Pipeline({k: "s" for k in names}, {k: "old" for k in names}, set(), set())
    diffs, in_flight, lagging, _, confirmed_by = settle(pipeline, FakeWatch(pipeline, delay=None))
    assert set(lagging) == set(names) == set(diffs.different) and not in_flight
    assert confirmed_by == "position"


@pytest.mark.parametrize("watch", ["none", "unknown"])
def test_without_a_known_position_the_recheck_falls_back_to_a_fixed_wait_and_says_so(watch: str) -> None:
    pipeline = Pipeline({1: "s", 2: "s"}, {1: "old", 2: "old"}, {1}, set())
    fake = None if watch == "none" else FakeWatch(pipeline, delay=0, unknown=True)
    diffs, _, _, _, confirmed_by = settle(pipeline, fake)
    # Nothing applies during a fixed wait here: both keys held still, so both are reported.
    assert set(diffs.different) == {1, 2}
    assert confirmed_by == "fixed wait"
