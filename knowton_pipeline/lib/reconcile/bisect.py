"""Store-agnostic bisection of key segments down to the exact differing keys (as data-diff does).

The stores compute a (count, checksum sum) per key segment; only segments whose checksums differ
are split, and only small ones are compared row by row. The bisection goes level by level, and asks each store
one question per level for all of that level's segments. Split points come from the keys actually
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
    levels: int = 0  # rounds of questions: each asks every store once for all its segments


Summed = tuple[Segment, Checksum, Checksum]  # a segment with its (source, target) checksums


def runs(parts: Sequence[Segment]) -> list[tuple[Segment, list[Segment]]]:
    """Sorted, disjoint `parts` grouped into runs of adjacent ones: (the run's segment, its parts)."""
    out: list[tuple[Segment, list[Segment]]] = []
    for part in parts:
        if out and out[-1][1][-1].hi is not None and out[-1][1][-1].hi == part.lo:
            run, members = out[-1]
            out[-1] = (Segment(run.lo, part.hi), [*members, part])
        else:
            out.append((part, [part]))
    return out


def find_differences(
    start: Sequence[Summed],
    split: Callable[[Sequence[Summed]], list[list[Summed]]],
    compare: Callable[[Sequence[Segment]], tuple[Differences, int]],
    *,
    threshold: int = 256,
) -> tuple[Differences, BisectStats]:
    """Differences between source and target under `start`: disjoint segments, each with both its checksums.

    Level by level, from `start`: every segment of a level whose checksums differ is either compared row by row (at most
    `threshold` rows on each side) or split, and all of a level's splits and all its comparisons are asked at once,
    so a store answers one question per level however many segments differ. `split(parents)` returns each parent's
    parts with their checksums, in key order (fewer than two: it cannot be cut, and is compared whole);
    `compare(segments)` compares the rows of small segments and returns the differences and the rows it read.
    """
    diffs, stats = Differences(), BisectStats()
    level = list(start)
    while level:
        stats.levels += 1
        stats.segments_checked += len(level)
        differing = [(seg, s, t) for seg, s, t in level if s != t]
        small = [seg for seg, s, t in differing if max(s.count, t.count) <= threshold]
        big = [item for item in differing if max(item[1].count, item[2].count) > threshold]
        level = []
        for (seg, _, _), parts in zip(big, split(big) if big else [], strict=True):
            if len(parts) < 2:
                small.append(seg)  # one key holds it all: compare it whole
            else:
                level.extend(parts)
        if small:
            found, rows = compare(small)
            diffs.extend(found)
            stats.segments_compared += len(small)
            stats.rows_compared += rows
    return diffs, stats
