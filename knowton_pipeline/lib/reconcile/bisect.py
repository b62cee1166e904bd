"""Store-agnostic bisection of key segments down to the exact differing keys (as data-diff does).

The stores compute a (count, checksum sum) per key segment; only segments whose checksums differ
are split, and only small ones are compared row by row. Split points come from the keys actually
present (quantiles of the side with more rows in the segment), so gaps in the key space and text
keys need no special case.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = Any  # int or str here; anything totally ordered the same way in every store


@dataclass(frozen=True)
class Segment:
    """Keys k with lo <= k < hi; None is unbounded on that side."""

    lo: Key | None = None
    hi: Key | None = None

    def contains(self, key: Key) -> bool:
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)

    def split(self, points: Sequence[Key]) -> list[Segment]:
        """Cut at `points` (any order, duplicates and points outside the segment ignored)."""
        inner = sorted({p for p in points if self.contains(p) and p != self.lo})
        bounds = [self.lo, *inner, self.hi]
        return [Segment(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class Checksum:
    count: int
    total: int  # sum of the rows' 60-bit hashes (cannot overflow the stores' wide integers)


@dataclass
class Differences:
    missing_in_target: list[Key] = field(default_factory=list)
    extra_in_target: list[Key] = field(default_factory=list)
    different: dict[Hashable, list[str]] = field(default_factory=dict)  # key -> differing columns

    def extend(self, other: Differences) -> None:
        self.missing_in_target += other.missing_in_target
        self.extra_in_target += other.extra_in_target
        self.different.update(other.different)

    @property
    def total(self) -> int:
        return len(self.missing_in_target) + len(self.extra_in_target) + len(self.different)


@dataclass
class BisectStats:
    segments_checked: int = 0
    segments_compared: int = 0
    rows_compared: int = 0  # rows that travelled to Python for the row-by-row comparison


def find_differences(
    root: Segment,
    checksums: Callable[[Segment], tuple[Checksum, Checksum]],
    split_points: Callable[[Segment, int, bool], list[Key]],
    compare_rows: Callable[[Segment], tuple[Differences, int]],
    *,
    threshold: int = 256,
    fanout: int = 16,
) -> tuple[Differences, BisectStats]:
    """Differences between source and target under `root`.

    `checksums(seg)` returns (source, target) checksums; `split_points(seg, parts, from_target)` returns
    up to parts-1 keys inside seg, from the target's keys when `from_target` (the side with more rows);
    `compare_rows(seg)` compares a small segment row by row and returns the differences and the number
    of rows it read.
    """
    diffs, stats = Differences(), BisectStats()
    pending = [root]
    while pending:
        seg = pending.pop()
        source, target = checksums(seg)
        stats.segments_checked += 1
        if source == target:
            continue
        if max(source.count, target.count) <= threshold:
            found, rows = compare_rows(seg)
            diffs.extend(found)
            stats.segments_compared += 1
            stats.rows_compared += rows
            continue
        children = seg.split(split_points(seg, fanout, target.count > source.count))
        if len(children) < 2:
            # Cannot be cut further (one key holds it all): compare it whole.
            found, rows = compare_rows(seg)
            diffs.extend(found)
            stats.segments_compared += 1
            stats.rows_compared += rows
            continue
        pending.extend(reversed(children))
    return diffs, stats
