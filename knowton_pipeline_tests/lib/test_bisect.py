"""Bisection finds exactly the differing keys, reading few rows, whatever the key space looks like."""

from __future__ import annotations

import bisect as _bisect
import itertools
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
    runs,
)
from knowton_pipeline.lib.reconcile.engine import prefix_length, prefix_parts


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


class Questions:
    """How many questions each store was asked: the level-wise bisection asks one per level, whatever the drift."""

    def __init__(self) -> None:
        self.splits = self.compares = 0


def run(source: dict, target: dict, threshold: int = 8, fanout: int = 4, asked: Questions | None = None):  # type: ignore[no-untyped-def]
    s, t = Side(source), Side(target)
    asked = asked or Questions()

    def compare(segments: Sequence[Segment]) -> tuple[Differences, int]:
        asked.compares += 1
        d, rows = Differences(), 0
        for seg in segments:
            ks, kt = in_segment(s.keys, seg), in_segment(t.keys, seg)
            d.extend(
                Differences(
                    missing_in_target=[k for k in ks if k not in target],
                    extra_in_target=[k for k in kt if k not in source],
                    different={k: ["row"] for k in ks if k in target and target[k] != source[k]},
                )
            )
            rows += len(ks) + len(kt)
        return d, rows

    def split(parents: Sequence[tuple[Segment, Checksum, Checksum]]) -> list:
        asked.splits += 1
        out = []
        for seg, cs, ct in parents:
            side = t if ct.count > cs.count else s
            parts = seg.split(quantile_points(in_segment(side.keys, seg), fanout))
            out.append([(p, s.checksum(p), t.checksum(p)) for p in parts] if len(parts) > 1 else [])
        return out

    root = Segment()
    return find_differences([(root, s.checksum(root), t.checksum(root))], split, compare, threshold=threshold)


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


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=2**32))
def test_each_store_is_asked_once_per_level_however_many_keys_differ(n_diff: int, seed: int) -> None:
    rnd = random.Random(seed)
    source = {k: rnd.randrange(2**60) for k in range(20_000)}
    target = dict(source)
    for k in rnd.sample(sorted(source), n_diff):
        target[k] += 1
    asked = Questions()
    diffs, stats = run(source, target, threshold=32, fanout=16, asked=asked)
    assert len(diffs.different) == n_diff
    # 20,000 rows cut 16-way reach 32 rows within four levels: a split and a comparison a level at most.
    assert asked.splits <= stats.levels and asked.compares <= stats.levels <= 5


@given(st.lists(st.integers(0, 50), unique=True, min_size=1, max_size=20), st.data())
def test_runs_group_exactly_the_adjacent_parts(bounds: list[int], data: st.DataObject) -> None:
    cuts = sorted(bounds)
    parts = [Segment(a, b) for a, b in itertools.pairwise(cuts)] or [Segment(cuts[0], cuts[0] + 1)]
    kept = [p for p in parts if data.draw(st.booleans())] or parts[:1]
    grouped = runs(kept)
    assert [p for _, members in grouped for p in members] == kept
    for run_, members in grouped:
        assert run_ == Segment(members[0].lo, members[-1].hi)
        assert all(a.hi == b.lo for a, b in itertools.pairwise(members))
    for (_, a), (_, b) in itertools.pairwise(grouped):
        assert a[-1].hi != b[0].lo  # separate runs are not adjacent


# Text keys as every store holds them: no NUL, any other character (a surrogate cannot be encoded, so none).
_TEXT_KEYS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=0, max_size=12
)


@given(
    keys=st.sets(_TEXT_KEYS, min_size=1, max_size=200),
    length=st.integers(1, 8),
    other=st.lists(_TEXT_KEYS),
    most=st.one_of(st.just(4096), st.integers(1, 50)),
)
@settings(max_examples=300, deadline=None)
def test_prefix_parts_put_every_key_in_its_beginnings_part_and_cover_every_other_key_once(
    keys: set[str], length: int, other: list[str], most: int
) -> None:
    sums: dict[str, Checksum] = {}
    for k in keys:
        c = sums.get(k[:length], Checksum(0, 0))
        sums[k[:length]] = Checksum(c.count + 1, c.total + row_hash(k))
    parts, by_part = prefix_parts(sums, most)
    assert len(parts) == len(by_part) <= min(len(sums), most)
    if len(sums) <= most:
        assert len(parts) == len(sums)  # one part a beginning: merged only beyond `most`
    assert parts[0].lo is None and parts[-1].hi is None
    assert all(a.hi == b.lo for a, b in itertools.pairwise(parts))
    # The keys each part holds are exactly those of its beginning: its checksum is the part's own.
    ordered = sorted(keys)
    assert by_part == [
        Checksum(len(found), sum(row_hash(k) for k in found)) for found in (in_segment(ordered, p) for p in parts)
    ]
    # A key the source does not have (a target's extra row) is in exactly one part.
    for k in other:
        assert sum(p.contains(k) for p in parts) == 1


@given(keys=st.lists(_TEXT_KEYS, min_size=1, max_size=300), wanted=st.integers(2, 64))
@settings(max_examples=200, deadline=None)
def test_the_prefix_length_cuts_the_sample_into_at_least_two_and_at_most_the_wanted_groups(
    keys: list[str], wanted: int
) -> None:
    n = prefix_length(keys, wanted)
    counts = {m: len({k[:m] for k in keys}) for m in range(1, 9)}
    if n is None:
        assert all(c < 2 or c > wanted for c in counts.values())
    else:
        assert 2 <= counts[n] <= wanted
        # The longest that does: every longer one is outside the bounds.
        assert all(not 2 <= counts[m] <= wanted for m in range(n + 1, 9))


def test_addresses_are_grouped_by_their_first_five_characters() -> None:
    rng = random.Random(7)
    sample = ["0x" + "".join(rng.choice("0123456789abcdef") for _ in range(40)) for _ in range(32_768)]
    assert prefix_length(sample, 4096) == 5
