"""Bisection finds exactly the differing keys, reading few rows, whatever the key space looks like."""

from __future__ import annotations

import bisect as _bisect
import random
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from knowton_pipeline.lib.canonical import row_hash
from knowton_pipeline.lib.reconcile.bisect import (
    Checksum,
    Differences,
    Key,
    Segment,
    find_differences,
)


def in_segment(sorted_keys: Sequence[Key], seg: Segment) -> Sequence[Key]:
    """The slice of already sorted keys that falls in `seg`."""
    lo = 0 if seg.lo is None else _bisect.bisect_left(sorted_keys, seg.lo)
    hi = len(sorted_keys) if seg.hi is None else _bisect.bisect_left(sorted_keys, seg.hi)
    return sorted_keys[lo:hi]


def quantile_points(sorted_keys: Sequence[Key], parts: int) -> list[Key]:
    """`parts - 1` split points taken evenly from already sorted keys (duplicates removed)."""
    if parts < 2 or len(sorted_keys) < 2:
        return []
    step = len(sorted_keys) / parts
    points = [sorted_keys[int(step * i)] for i in range(1, parts)]
    out: list[Key] = []
    for p in points:
        if not out or p != out[-1]:
            out.append(p)
    return out


class Side:
    """An in-memory store: key -> row hash, checksummed and split like the real ones."""

    def __init__(self, rows: dict):
        self.rows = rows
        self.keys = sorted(rows)

    def checksum(self, seg: Segment) -> Checksum:
        # As in the stores, a row's hash covers its key too: a missing row and an extra row with the same value
        # elsewhere in the segment must not cancel out.
        keys = in_segment(self.keys, seg)
        return Checksum(len(keys), sum(row_hash(f"{k!r}\t{self.rows[k]}") for k in keys))


def run(source: dict, target: dict, threshold: int = 8, fanout: int = 4):  # type: ignore[no-untyped-def]
    s, t = Side(source), Side(target)

    def compare(seg: Segment) -> tuple[Differences, int]:
        ks, kt = in_segment(s.keys, seg), in_segment(t.keys, seg)
        d = Differences(
            missing_in_target=[k for k in ks if k not in target],
            extra_in_target=[k for k in kt if k not in source],
            different={k: ["row"] for k in ks if k in target and target[k] != source[k]},
        )
        return d, len(ks) + len(kt)

    def points(seg: Segment, parts: int, from_target: bool) -> list:
        side = t if from_target else s
        return quantile_points(in_segment(side.keys, seg), parts)

    return find_differences(
        Segment(), lambda seg: (s.checksum(seg), t.checksum(seg)), points, compare, threshold=threshold, fanout=fanout
    )


keys_int = st.integers(min_value=-(2**63), max_value=2**63 - 1)
keys_text = st.text(alphabet="0123456789abcdefx", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.dictionaries(keys_int, st.integers(0, 2**60 - 1), max_size=300),
        st.dictionaries(keys_text, st.integers(0, 2**60 - 1), max_size=300),
    ),
    st.data(),
)
def test_bisection_reports_exactly_the_missing_extra_and_different_keys(source: dict, data: st.DataObject) -> None:
    target = dict(source)
    keys = sorted(source)
    missing = data.draw(st.sets(st.sampled_from(keys), max_size=10)) if keys else set()
    changed = data.draw(st.sets(st.sampled_from(keys), max_size=10)) if keys else set()
    for k in missing:
        del target[k]
    for k in changed - missing:
        target[k] = (target[k] + 1) % 2**60
    key_type = type(keys[0]) if keys else int
    extra_keys = data.draw(st.sets(keys_int if key_type is int else keys_text, max_size=10))
    extra = {k for k in extra_keys if k not in source}
    for k in extra:
        target[k] = 1

    diffs, _ = run(source, target)
    assert sorted(diffs.missing_in_target) == sorted(missing)
    assert sorted(diffs.extra_in_target) == sorted(extra)
    assert set(diffs.different) == changed - missing


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=2**32))
def test_rows_read_stay_a_small_multiple_of_differences_times_threshold(n_diff: int, seed: int) -> None:
    rnd = random.Random(seed)
    source = {k * 7: rnd.randrange(2**60) for k in range(20_000)}  # gaps in the key space
    target = dict(source)
    for k in rnd.sample(sorted(source), n_diff):
        target[k] += 1
    threshold, fanout = 32, 16
    diffs, stats = run(source, target, threshold=threshold, fanout=fanout)
    assert len(diffs.different) == n_diff
    assert stats.rows_compared <= 2 * n_diff * threshold * 2  # both sides, a segment each at most
    assert stats.rows_compared < len(source) / 10


def test_identical_sides_take_one_checksum_and_read_no_rows() -> None:
    rows = {k: k * 31 for k in range(5000)}
    diffs, stats = run(rows, dict(rows))
    assert diffs.total == 0 and stats.segments_checked == 1 and stats.rows_compared == 0


def test_a_segment_of_a_single_key_is_compared_whole() -> None:
    assert Segment(5, 6).split([5]) == [Segment(5, 6)]
    assert Segment(None, None).split([3, 1, 3]) == [Segment(None, 1), Segment(1, 3), Segment(3, None)]
