"""Reconcile a PostgreSQL table with one target (a ClickHouse mirror or an Elasticsearch index).

Modes:
- `checksum`: every row. The checksum of the whole table; when it differs, a level-by-level bisection of the key
  segments whose checksums differ (a big table is cut at once into parts of about half the threshold, in one
  grouped scan per store), down to a row-by-row comparison of small segments, all of a level's segments in one
  query per store; then, only when some day's count can differ, which days' counts do. The source is summed by
  parts in its first scan (an integer key's range cut evenly, text keys grouped by their first characters), so
  that only the target is scanned again when the two differ. A ClickHouse mirror sums the hash it stored with each
  row (computed from the row on insert and by every mutation); Elasticsearch sums the hash the writer stored.
- `full`: as `checksum`, but a mirror's hash is computed from its columns, and an Elasticsearch index is streamed
  and hashed from `_source`, so an edit made directly in the index is caught.
- `incremental`: only the keys whose updated-at falls in the window (plus a margin) on either side,
  compared row by row. Hard deletes leave no updated-at behind: the daily full run finds those.

Differences found in the first pass are re-checked against a known position: an anchor committed after the
comparison read the source gives a position P, and once the target's sink has applied past P (`applied.py`) a key
whose source is unchanged and whose target still differs is drift, at once; a key that now matches was in flight;
a key whose source moved is re-checked with a new P. So an idle pipeline confirms drift without waiting, and a busy,
healthy one reports nothing. A target that has not applied past P within `stuck_seconds`, or a key whose source
keeps changing while its target never moves for `stuck_seconds`, is not in flight: the key is reported as lagging,
with how long its target has been seen standing still.

Without a Kafka bootstrap, or when the sink's group cannot be read, the re-check falls back to a fixed wait of
`settle_seconds` between rounds (a key is reported when neither side moved in between and they still differ), and
the result says so (`confirmed_by`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import elastic_transport
import psycopg
from clickhouse_connect.driver import exceptions as ch_errors
from elasticsearch import ApiError

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib import canonical
from knowton_pipeline.lib.errors import describe_error
from knowton_pipeline.lib.reconcile.applied import PositionUnknownError, PositionWatch, position_watch
from knowton_pipeline.lib.reconcile.bisect import (
    BisectStats,
    Checksum,
    Differences,
    Key,
    Segment,
    Summed,
    find_differences,
)
from knowton_pipeline.lib.stores import Side, TargetStore, target_store
from knowton_pipeline.lib.stores.base import short_start
from knowton_pipeline.lib.stores.postgres import PostgresSide

Mode = Literal["incremental", "checksum", "full"]
MODES: tuple[str, ...] = ("incremental", "checksum", "full")
Pair = tuple[str | None, str | None]  # (source, target) canonical strings of a key; None: no live row
Recheck = Literal["settled", "drift", "moved"]
# How differences were confirmed: against a position the target applied past, after a fixed wait, or not at all.
Confirmation = Literal["position", "fixed wait", "none"]

# The first pass sums the source by at most this many parts: more groups cost its scan more (at 10M rows,
# PostgreSQL's grouped checksum took 3-4% longer than the plain one with 4,096 parts, 6.5% with 16,384).
FIRST_PASS_PARTS = 4096

STORE_ERRORS = (psycopg.Error, ch_errors.Error, ApiError, elastic_transport.TransportError, OSError)


def recheck(before: Pair, now: Pair, *, applied: bool) -> Recheck:
    """What a re-check of a differing key says. `before` is the key's (source, target) as compared earlier, `now`
    as read again. `applied`: the target had applied past a position anchored after `before`'s source read, so
    it holds every change that read could see; an unchanged source it still differs from is drift. Without that
    knowledge (after a fixed wait), a key is drift only when neither side moved."""
    if now[0] == now[1]:
        return "settled"  # it was in flight
    if applied:
        return "drift" if now[0] == before[0] else "moved"
    return "drift" if now == before else "moved"


class ReconcileError(RuntimeError):
    """A store failed mid-run: there is no verdict, and no partial result is presented as one."""


@dataclass(frozen=True)
class ReconcileOptions:
    mode: Mode = "checksum"
    threshold: int = 256  # segments with at most this many rows on each side are compared row by row
    fanout: int = 16  # parts per split at least; a big segment is cut into about rows / threshold parts
    max_fanout: int = 16384  # parts per split at most (a store may allow fewer, see Side.max_parts)
    window: timedelta = timedelta(hours=1)  # incremental: rows changed this long ago or later...
    margin: timedelta = timedelta(minutes=5)  # ...plus this much, for changes applied late
    # Re-check differences (0 reports the first pass as is); without a known position, wait this long between rounds.
    settle_seconds: float = 5.0
    recheck_rounds: int = 3
    # A target that has not moved this long while its source did is stuck, not in flight: reported as lagging.
    stuck_seconds: float = 60.0
    max_recheck: int = 10_000  # differences beyond this many are reported without a re-check

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown reconciliation mode {self.mode!r}; modes are: {', '.join(MODES)}")
        if self.threshold < 1 or self.fanout < 2:
            raise ValueError("threshold must be at least 1 and fanout at least 2")


@dataclass
class ReconcileResult:
    table: str
    target: str
    mode: str
    source_rows: int
    target_rows: int
    differences: Differences
    stats: BisectStats
    seconds: float
    in_flight: list[Key] = field(default_factory=list)  # still changing after every re-check: not reported
    # Keys whose source changed while the target stood still for `stuck_seconds` or more -> seconds seen still.
    # They are part of `differences` too (reported, recorded and repaired like any drift).
    lagging: dict[Key, float] = field(default_factory=dict)
    unconfirmed: int = 0  # differences reported without a re-check (beyond max_recheck)
    day_counts: dict[date | None, tuple[int, int]] = field(default_factory=dict)  # days whose counts differ
    first_pass: int = 0  # differences before the re-check
    confirmed_by: Confirmation = "none"
    confirmation_note: str = ""  # why the re-check fell back to a fixed wait, when it did

    @property
    def clean(self) -> bool:
        return self.differences.total == 0

    @property
    def columns(self) -> dict[str, int]:
        """Differing column -> how many keys differ in it."""
        counts: dict[str, int] = {}
        for cols in self.differences.different.values():
            for c in cols:
                counts[c] = counts.get(c, 0) + 1
        return counts

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds else 0.0

    def as_dict(self, sample: int = 20) -> dict[str, Any]:
        d = self.differences
        return {
            "table": self.table,
            "target": self.target,
            "mode": self.mode,
            "clean": self.clean,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "missing_in_target": len(d.missing_in_target),
            "extra_in_target": len(d.extra_in_target),
            "different": len(d.different),
            "sample_missing": [str(k) for k in d.missing_in_target[:sample]],
            "sample_extra": [str(k) for k in d.extra_in_target[:sample]],
            "sample_different": {str(k): cols for k, cols in list(d.different.items())[:sample]},
            "differing_columns": self.columns,
            "days_with_count_mismatch": {
                str(day): {"source": s, "target": t} for day, (s, t) in sorted(self.day_counts.items(), key=str)
            },
            "in_flight": len(self.in_flight),
            "lagging": len(self.lagging),
            "sample_lagging": {str(k): round(age, 1) for k, age in list(self.lagging.items())[:sample]},
            "first_pass_differences": self.first_pass,
            "unconfirmed": self.unconfirmed,
            "confirmed_by": self.confirmed_by,
            "confirmation_note": self.confirmation_note,
            "segments_checked": self.stats.segments_checked,
            "rows_compared": self.stats.rows_compared,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }


class Reconciler:
    """One table against one target; `source` and `target` are sides (see `lib/stores/base.py`) over the same columns."""

    def __init__(
        self,
        table: SyncedTable,
        store: TargetStore,
        source: Side,
        target: Side,
        options: ReconcileOptions | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        now: Callable[[], datetime] | None = None,
        watch: PositionWatch | None = None,
        make_visible: Callable[[], None] | None = None,
    ):
        """`watch` tells when the target has applied past a source position (None: the re-check waits a fixed
        time); `make_visible` makes the target's applied writes visible to the next read."""
        self.table, self.store, self.target_name = table, store, store.name
        self.source, self.target = source, target
        self.options = options or ReconcileOptions()
        self.columns = canonical.column_names(table, store.shape)
        self._integer_key = table.column(table.key[0]).type in ("int", "bigint")
        self._on_progress = on_progress or (lambda _message: None)
        self._now = now or (lambda: datetime.now(UTC))
        self._seen: dict[Key, Pair] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._watch, self._make_visible = watch, make_visible or (lambda: None)
        self.confirmed_by: Confirmation = "none"
        self.confirmation_note = ""

    # --- both sides at once --------------------------------------------------------------------
    def _both(self, on_source: Callable[[], Any], on_target: Callable[[], Any]) -> tuple[Any, Any]:
        """Run the two stores' halves of a question concurrently: each computes inside its own process."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile-target")
        future = self._pool.submit(on_target)
        try:
            s = on_source()
        finally:
            t = future.result()
        return s, t

    # --- the bisection's callbacks ---------------------------------------------------------------
    def split(self, parents: Sequence[Summed]) -> list[list[Summed]]:
        """Cut every parent into parts of about half the threshold; the checksums of all the parts of all the
        parents come from one question per store."""
        children = [seg.split(self._cut(seg, s, t)) for seg, s, t in parents]
        flat = [part for parts in children if len(parts) > 1 for part in parts]
        if not flat:
            return [[] for _ in parents]
        s, t = self._both(lambda: self.source.checksums_of(flat), lambda: self.target.checksums_of(flat))
        sums = dict(zip(flat, zip(s, t, strict=True), strict=True))
        return [[(part, *sums[part]) for part in parts] if len(parts) > 1 else [] for parts in children]

    def _fanout(self, rows: int) -> int:
        """Cut a big segment straight into parts of about half the threshold: with sparse drift, one grouped scan
        then isolates every differing part, and most need no further split before their rows are compared."""
        wanted = math.ceil(2 * rows / self.options.threshold)
        limit = min(self.options.max_fanout, self.source.max_parts, self.target.max_parts)
        return max(self.options.fanout, min(wanted, limit))

    def _cut(self, seg: Segment, source: Checksum, target: Checksum) -> list[Key]:
        """Where to cut `seg`, from the keys of the side with more rows in it."""
        side, count = (self.target, target.count) if target.count > source.count else (self.source, source.count)
        parts = self._fanout(max(source.count, target.count))
        if self._integer_key:
            # Integer keys are cut arithmetically: between the bounds of a segment that has both, else between the
            # side's smallest and largest key in it (an indexed min/max). Gaps only make some parts empty.
            if seg.lo is not None and seg.hi is not None:
                lo, hi = int(seg.lo), int(seg.hi) - 1
            else:
                bounds = side.key_bounds(seg)
                if bounds is None:
                    return []
                lo, hi = int(bounds[0]), int(bounds[1])
            return _even_points(lo, hi, parts)
        points = side.split_points(seg, parts, count)
        # Text keys are cut at their first 8 bytes when that keeps most cuts: every store then finds a key's part by
        # a binary search of those prefixes (see stores/base.py, short_starts).
        short = sorted({short_start(p) for p in points})
        return short if 2 * len(short) >= len(points) else points

    def compare_rows(self, segments: Sequence[Segment]) -> tuple[Differences, int]:
        ordered = sorted(segments, key=lambda seg: (seg.lo is not None, seg.lo if seg.lo is not None else 0))
        source, target = self._both(lambda: self.source.rows_of(ordered), lambda: self.target.rows_of(ordered))
        return self._compare(source, target), len(source) + len(target)

    # --- comparison ----------------------------------------------------------------------------
    def _differing_columns(self, a: str, b: str) -> list[str]:
        x, y = a.split(canonical.SEPARATOR), b.split(canonical.SEPARATOR)
        return [n for n, u, v in zip(self.columns, x, y, strict=False) if u != v] or ["(row)"]

    def _classify(self, pairs: dict[Key, Pair]) -> Differences:
        diffs = Differences()
        for key, (a, b) in pairs.items():
            if a is not None and b is None:
                diffs.missing_in_target.append(key)
            elif a is None and b is not None:
                diffs.extra_in_target.append(key)
            elif a is not None and b is not None and a != b:
                diffs.different[key] = self._differing_columns(a, b)
        return diffs

    def _compare(self, source: dict[Key, str], target: dict[Key, str]) -> Differences:
        pairs: dict[Key, Pair] = {}
        for key in source.keys() | target.keys():
            a, b = source.get(key), target.get(key)
            if a != b:
                pairs[key] = (a, b)
        self._seen.update(pairs)
        return self._classify(pairs)

    def _compare_keys(self, keys: Sequence[Key]) -> tuple[dict[Key, str], dict[Key, str]]:
        return self._both(lambda: self.source.rows_for_keys(keys), lambda: self.target.rows_for_keys(keys))

    def differing_keys(self, keys: Sequence[Key]) -> list[Key]:
        """Which of `keys` differ between the two sides right now (no re-check)."""
        try:
            source, target = self._compare_keys(keys)
        finally:
            self.close()
        return [k for k in keys if source.get(k) != target.get(k)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    # --- the in-flight re-check -----------------------------------------------------------------
    def _settle(self, first: Differences) -> tuple[Differences, list[Key], dict[Key, float], int]:
        """Keep the differences that are confirmed; return them, the keys still moving, the keys whose target is
        stuck (with how long it stood still) and how many went unchecked."""
        opts = self.options
        keys = [*first.missing_in_target, *first.extra_in_target, *first.different]
        if opts.settle_seconds <= 0 or not keys:
            return first, [], {}, 0
        started = time.monotonic()
        checked, unchecked = keys[: opts.max_recheck], keys[opts.max_recheck :]
        confirmed: dict[Key, Pair] = {k: self._seen[k] for k in unchecked}
        previous = {k: self._seen[k] for k in checked}
        first_target = {k: pair[1] for k, pair in previous.items()}
        pending = checked
        target_moved: list[Key] = []  # in flight for sure: the target is applying changes
        behind = False  # the target did not apply past a position within stuck_seconds of it
        round_ = 0
        while pending:
            # After the usual rounds, only keys whose target has not moved since the first pass are re-checked
            # further, until they are stuck long enough to report.
            if round_ >= opts.recheck_rounds:
                target_moved += [k for k in pending if previous[k][1] != first_target[k]]
                pending = [k for k in pending if previous[k][1] == first_target[k]]
                if not pending or time.monotonic() - started >= opts.stuck_seconds:
                    break
            round_ += 1
            applied = self._wait_applied(len(pending), round_, opts.stuck_seconds)
            if applied is None:
                self.confirmed_by = "fixed wait"
                self._on_progress(
                    f"re-checking {len(pending)} differing key(s) in {opts.settle_seconds:g} s (round {round_})"
                )
                time.sleep(opts.settle_seconds)
            else:
                self.confirmed_by = "position"
                behind = not applied
            source, target = self._compare_keys(pending)
            moving = []
            for key in pending:
                now = (source.get(key), target.get(key))
                if behind:  # a target still behind the position confirms nothing: what still differs is lagging
                    verdict: Recheck = "settled" if now[0] == now[1] else "moved"
                else:
                    verdict = recheck(previous[key], now, applied=applied is True)
                if verdict == "drift":
                    confirmed[key] = now
                elif verdict == "moved":
                    previous[key] = now
                    moving.append(key)
            pending = moving
            if behind:
                break
        still = time.monotonic() - started
        if behind:  # the target is more than stuck_seconds behind the comparison: every key it still differs in
            lagging = dict.fromkeys(pending, still)
        else:
            stuck = still >= opts.stuck_seconds
            lagging = {k: still for k in pending if previous[k][1] == first_target[k] and stuck}
        confirmed.update({k: previous[k] for k in lagging})
        in_flight = target_moved + [k for k in pending if k not in lagging]
        return self._classify(confirmed), in_flight, lagging, len(unchecked)

    def _wait_applied(self, keys: int, round_: int, stuck_seconds: float) -> bool | None:
        """Anchor a position after the source was read and wait until the target has applied past it: True once it
        has, False when it has not within `stuck_seconds`, None when it cannot be known (then the caller waits a
        fixed time)."""
        if self._watch is None:
            return None
        try:
            position = self._watch.anchor()
            deadline = time.monotonic() + stuck_seconds
            self._on_progress(
                f"re-checking {keys} differing key(s) once {self.target_name} has applied past {position} (round {round_})"
            )
            said = [time.monotonic()]

            def waiting(seconds: float) -> None:
                # The progress callback also gives a store the caller holds (the embedded engine) its sink turns.
                if time.monotonic() - said[0] >= 1.0:
                    said[0] = time.monotonic()
                    self._on_progress(f"waiting for {self.target_name} to apply past {position} ({seconds:.0f} s)")

            applied = self._watch.wait(position, deadline, waiting) == "applied"
        except PositionUnknownError as exc:
            self.confirmation_note = f"position unknown, fell back to a fixed wait: {exc}"
            self._on_progress(self.confirmation_note)
            self._watch.close()
            self._watch = None
            return None
        if applied:
            self._make_visible()
        return applied

    # --- the run -------------------------------------------------------------------------------
    def _first_pass(self) -> Callable[[], tuple[list[Segment], list[Checksum]]] | None:
        """How the first pass sums the source by parts, so that drift needs no second scan of it; None: whole.
        - An integer key's range, between the source's indexed smallest and largest key, is cut arithmetically
          into parts of about half the threshold (FIRST_PASS_PARTS at most).
        - Text keys are grouped by their first n characters, n chosen on a sample of keys so that there are about
          as many groups. Each group is a part from its beginning to the next one's: a key begins with its group's
          beginning, so it is at or above it, and below every greater beginning."""
        root = Segment()
        if self._integer_key:
            bounds = self.source.key_bounds(root)
            if bounds is None or int(bounds[1]) - int(bounds[0]) < self.options.threshold:
                return None
            lo, hi = int(bounds[0]), int(bounds[1])
            parts = root.split(_even_points(lo, hi, min(self._fanout(hi - lo + 1), FIRST_PASS_PARTS)))
            return lambda: (parts, self.source.checksums_of(parts))
        source = self.source
        if not isinstance(source, PostgresSide):
            return None
        sample, rows = source.sample_keys(8 * FIRST_PASS_PARTS)
        if rows is None or rows < self.options.threshold:
            return None  # (None: a big table never analyzed, whose sample may be its first pages only)
        length = prefix_length(sample, min(self._fanout(rows), FIRST_PASS_PARTS))
        if length is None:
            return None
        return lambda: prefix_parts(source.prefix_checksums(length))

    def _full_pass(self) -> tuple[Differences, BisectStats, int, int, dict[date | None, tuple[int, int]]]:
        # The source, the costlier store to scan, is summed by parts in the same scan that sums it whole; the target
        # is summed whole, and by the same parts only when the two differ. A clean run costs the source a grouped
        # scan (a few percent more than a plain one); drift costs one more scan of the target, not of both.
        root = Segment()
        parts: list[Segment] = []
        by_part: list[Checksum] = []
        first = self._first_pass()
        if first is not None:
            (parts, by_part), t = self._both(first, lambda: self.target.checksum(root))
            s = Checksum(sum(c.count for c in by_part), sum(c.total for c in by_part))
        else:
            s, t = self._both(lambda: self.source.checksum(root), lambda: self.target.checksum(root))
        self._on_progress(f"{self.table.name}: {s.count} rows in PostgreSQL, {t.count} in {self.target_name}")
        start: list[Summed] = [(root, s, t)]
        if len(parts) > 1 and s != t:
            start = list(zip(parts, by_part, self.target.checksums_of(parts), strict=True))
        diffs, stats = find_differences(start, self.split, self.compare_rows, threshold=self.options.threshold)
        mismatched_days: dict[date | None, tuple[int, int]] = {}
        if s.count != t.count or self._may_move_days(diffs):
            # Which days' counts differ: a second scan, only when some day's count can differ at all.
            days_s, days_t = self._both(self.source.day_checksums, self.target.day_checksums)
            zero = Checksum(0, 0)
            mismatched_days = {
                d: (days_s.get(d, zero).count, days_t.get(d, zero).count)
                for d in days_s.keys() | days_t.keys()
                if days_s.get(d, zero).count != days_t.get(d, zero).count
            }
        return diffs, stats, s.count, t.count, mismatched_days

    def _may_move_days(self, diffs: Differences) -> bool:
        """Whether these differences can make some day's count differ: a day is the creation time's, so only a
        missing or extra row, or a row whose creation time differs, moves one."""
        if diffs.missing_in_target or diffs.extra_in_target:
            return True
        created = self.table.created_at
        return any(created in cols or "(row)" in cols for cols in diffs.different.values()) if created else False

    def _incremental_pass(self) -> tuple[Differences, BisectStats, int, int]:
        since = self._now() - self.options.window - self.options.margin
        changed_s, changed_t = self._both(
            lambda: self.source.changed_keys(since), lambda: self.target.changed_keys(since)
        )
        keys = sorted(changed_s | changed_t)
        self._on_progress(f"{self.table.name}: {len(keys)} key(s) changed since {since.isoformat()}")
        source, target = self._compare_keys(keys)
        stats = BisectStats(segments_compared=1, rows_compared=len(source) + len(target))
        return self._compare(source, target), stats, len(changed_s), len(changed_t)

    def run(self) -> ReconcileResult:
        t0 = time.monotonic()
        try:
            day_counts: dict[date | None, tuple[int, int]] = {}
            if self.options.mode == "incremental":
                first, stats, source_rows, target_rows = self._incremental_pass()
            else:
                first, stats, source_rows, target_rows, day_counts = self._full_pass()
            diffs, in_flight, lagging, unconfirmed = self._settle(first)
        except STORE_ERRORS as exc:
            raise ReconcileError(
                f"reconciling {self.table.name} with {self.target_name} stopped after {time.monotonic() - t0:.1f} s, "
                f"no verdict: {describe_error(exc)}"
            ) from exc
        finally:
            self.close()
        return ReconcileResult(
            table=self.table.name,
            target=self.target_name,
            mode=self.options.mode,
            source_rows=source_rows,
            target_rows=target_rows,
            differences=diffs,
            stats=stats,
            seconds=time.monotonic() - t0,
            in_flight=in_flight,
            lagging=lagging,
            unconfirmed=unconfirmed,
            day_counts=day_counts,
            first_pass=first.total,
            confirmed_by=self.confirmed_by,
            confirmation_note=self.confirmation_note,
        )


def prefix_length(sample: Sequence[str], wanted: int) -> int | None:
    """The longest beginning, 1 to 8 characters, that cuts the keys of `sample` into at least 2 and at most
    `wanted` groups; None when none does."""
    best = None
    for n in range(1, 9):
        groups = len({key[:n] for key in sample})
        if groups > wanted:
            break
        if groups >= 2:
            best = n
    return best


def prefix_parts(sums: dict[str, Checksum], most: int = FIRST_PASS_PARTS) -> tuple[list[Segment], list[Checksum]]:
    """Parts of the whole key space from the checksums of the keys' beginnings (`PostgresSide.prefix_checksums`):
    each beginning's part runs from it to the next one, the first unbounded below and the last above. Beyond `most`
    beginnings (the sample that chose their length missed how many the table has), neighbours are merged: a run of
    beginnings is one part, from the first of them to the next run's, summed."""
    starts = sorted(sums)
    if not starts:
        return [], []
    size = math.ceil(len(starts) / most)
    groups = [starts[i : i + size] for i in range(0, len(starts), size)]
    bounds: list[Key | None] = [None, *(run[0] for run in groups[1:]), None]
    parts = [Segment(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    totals = [Checksum(sum(sums[p].count for p in run), sum(sums[p].total for p in run)) for run in groups]
    return parts, totals


def _even_points(lo: int, hi: int, parts: int) -> list[int]:
    """Cuts of the integer keys lo..hi into `parts` parts of even width (fewer when the range is narrower)."""
    points = sorted({lo + (hi - lo + 1) * i // parts for i in range(1, parts)} - {lo})
    return [p for p in points if lo < p <= hi]


def build_reconciler(
    table: SyncedTable,
    target: str,
    *,
    conn: psycopg.Connection,
    client: Any,
    options: ReconcileOptions | None = None,
    on_progress: Callable[[str], None] | None = None,
    bootstrap: str | None = None,
) -> Reconciler:
    """The reconciler of `table` with the target store named `target`, over its `client`. With `bootstrap` (Kafka),
    differences are confirmed once the target's sink has applied past the comparison; without, after a fixed wait."""
    store = target_store(target)
    if client is None:
        raise ValueError(f"reconciling with {store.name} needs a {store.title} client")
    if not store.holds(table):
        raise ValueError(f"{table.name} is not kept in {store.title}")
    options = options or ReconcileOptions()
    report = on_progress or (lambda _m: None)
    side = store.side(client, table, full=options.mode == "full", progress=lambda n: report(f"{n} documents hashed"))
    source = PostgresSide(conn, table, shape=store.shape)
    return Reconciler(
        table,
        store,
        source,
        side,
        options,
        on_progress=on_progress,
        watch=position_watch(conn, store.name, bootstrap) if options.settle_seconds > 0 else None,
        make_visible=lambda: store.make_visible(client, table),
    )
