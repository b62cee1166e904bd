"""What every store module provides: the reconcile side, the writer and its outcome, and the target-store contract.

A store module (`postgres`, `clickhouse`, `elasticsearch`) spells canonical rows in its own language, answers a
reconciliation as a `Side`, and, for a target, writes versioned rows through a `Writer`. The sync, the repair and
the reconciliation only ever talk to a store through these contracts and the registry in `lib/stores/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.canonical import Shape
from knowton_pipeline.lib.reconcile.bisect import Checksum, Key, Segment, runs
from knowton_pipeline.lib.settings import Settings

# Keys per query when rows are fetched by key (the in-flight re-check, incremental mode).
KEY_CHUNK = 2000
# Key ranges per query when the rows or checksums of many segments are asked at once.
RANGES_PER_QUERY = 500
# Parts per query when a text key is compared with every part's start (starts longer than 8 bytes).
LINEAR_PARTS = 256
NO_DAY: date | None = None


# ---------------------------------------------------------------------------------------------------------------
# Reconciliation


class Side(Protocol):
    """What the reconciler asks of a store, about the live rows of one table whose key is in a segment."""

    label: str
    max_parts: int  # parts one segment may be split into

    def day_checksums(self) -> dict[date | None, Checksum]:
        """(count, checksum) of all live rows, per UTC creation day (None when the table has no creation day)."""
        ...

    def checksum(self, seg: Segment) -> Checksum: ...

    def split_checksums(self, seg: Segment, points: Sequence[Key]) -> list[Checksum]:
        """The checksums of `seg.split(points)`'s parts in one pass (`points` sorted, inside `seg`, above its lo)."""
        ...

    def checksums_of(self, parts: Sequence[Segment]) -> list[Checksum]:
        """The checksums of sorted, disjoint `parts` (the parts of every segment split at one level), in one pass
        where the store can."""
        ...

    def key_bounds(self, seg: Segment) -> tuple[Key, Key] | None:
        """The smallest and largest key in `seg`, None when it is empty."""
        ...

    def split_points(self, seg: Segment, parts: int, count: int) -> list[Key]:
        """About `parts - 1` keys of this side inside `seg`, cutting it into parts of similar size."""
        ...

    def rows(self, seg: Segment) -> dict[Key, str]:
        """Key -> canonical string of every live row in `seg`."""
        ...

    def rows_of(self, segments: Sequence[Segment]) -> dict[Key, str]:
        """Key -> canonical string of every live row in any of sorted, disjoint `segments`, in one query where the
        store can."""
        ...

    def rows_for_keys(self, keys: Sequence[Key]) -> dict[Key, str]:
        """Key -> canonical string of the live rows among `keys` (absent keys are left out)."""
        ...

    def changed_keys(self, since: datetime) -> set[Key]:
        """Keys of the live rows whose updated-at is at or after `since`."""
        ...


def single_key(table: SyncedTable) -> str:
    if len(table.key) != 1:
        raise ValueError(f"{table.name}: reconciliation needs a single-column key, the key is {table.key}")
    return table.key[0]


def chunks(keys: Sequence[Key], size: int = KEY_CHUNK) -> Iterator[list[Key]]:
    for i in range(0, len(keys), size):
        yield list(keys[i : i + size])


def text_prefix(key: str) -> int:
    """The first 8 bytes of a text key (UTF-8, padded with zero bytes) as a big-endian number: it never decreases
    as the key grows in byte order. The stores compute the same to find a text key's part by binary search."""
    return int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "big")


def short_start(key: str) -> str:
    """The longest beginning of `key` of at most 8 UTF-8 bytes (whole characters). Cutting text keys at such
    starts lets a store find a key's part by its `text_prefix` alone (see `short_starts`)."""
    data = key.encode()
    return key if len(data) <= 8 else data[:8].decode("utf-8", errors="ignore")


def short_starts(parts: Sequence[Segment]) -> bool:
    """Whether every start of the parts is at most 8 UTF-8 bytes long: then a key (text without NUL, as every store
    holds it) is at or above a start exactly when its `text_prefix` is, and a binary search of the starts' prefixes
    finds its part."""
    return all(len(p.lo.encode()) <= 8 for p in parts if p.lo is not None)


def checksums_by_runs(side: Side, parts: Sequence[Segment]) -> list[Checksum]:
    """`Side.checksums_of` for a store that splits one segment at a time: one split per run of adjacent parts."""
    out: list[Checksum] = []
    for _, members in runs(parts):
        for piece in chunks(members, side.max_parts):
            run = Segment(piece[0].lo, piece[-1].hi)
            out += [side.checksum(run)] if len(piece) == 1 else side.split_checksums(run, [p.lo for p in piece[1:]])
    return out


def buckets(rows: Sequence[Sequence[Any]], parts: int) -> list[Checksum]:
    """Per-bucket (index, count, sum) rows as one checksum per part, empty parts included."""
    out = [Checksum(0, 0)] * parts
    for b, count, total in rows:
        out[int(b)] = Checksum(int(count), int(total))
    return out


def sum_by_day(rows: Sequence[Sequence[Any]]) -> dict[date | None, Checksum]:
    return {r[0]: Checksum(int(r[1]), int(r[2])) for r in rows}


def no_updated_at(table: SyncedTable) -> ValueError:
    return ValueError(f"{table.name} has no updated-at column: incremental mode cannot apply")


# ---------------------------------------------------------------------------------------------------------------
# Writes


class TransientStoreError(RuntimeError):
    """The store is down or overloaded: retry the batch later, do not dead-letter anything."""


class StoreRefusedError(TransientStoreError):
    """The store refuses every write to a table or index (a block, a missing table, a resource limit): an
    outage to wait out, never a reason to dead-letter the records that met it."""


@dataclass(frozen=True)
class WriteItem:
    table: SyncedTable
    row: Mapping[str, Any]
    version: int
    deleted: bool
    sources: tuple[Any, ...] = ()  # what to dead-letter if this item is poison (Kafka messages)
    enrichment: Mapping[str, Any] | None = None  # a search document's derived fields


@dataclass
class WriteOutcome:
    written: int = 0
    stale: int = 0  # refused because the store already holds a newer version
    poison: list[tuple[WriteItem, BaseException]] = field(default_factory=list)


@dataclass
class Prepared:
    """Transformed items ready to send, with the items that already failed their transform."""

    outcome: WriteOutcome
    payload: Any


class Writer(Protocol):
    """Versioned, idempotent batch writes to one target store.

    A write either succeeds, is refused for good (poison: returned in the outcome, for the DLQ), or the store is
    unavailable or refuses writes store-wide (`TransientStoreError`: the caller retries the whole batch, harmless
    because every write carries its version). Errors are classified by cause, never by how many rows failed.

    A writer whose `takes_columns` is true also takes a batch's usual changes of a table as columns
    (`prepare_columns(prepared, changes, tombstones_below=..., items=...)`, see `ClickHouseWriter`): the same
    writes as `prepare(items())`, with no object per row."""

    takes_columns: bool

    def prepare(self, items: Sequence[WriteItem]) -> Prepared:
        """Transform (CPU only, no I/O): can run on another thread while the previous batch is sent."""
        ...

    def send(self, prepared: Prepared) -> WriteOutcome: ...

    def write(self, items: Sequence[WriteItem]) -> WriteOutcome: ...

    def truncate(self, table: SyncedTable, version: int) -> int:
        """Every live row of `table` older than `version` becomes a tombstone at `version` (a TRUNCATE)."""
        ...


def tombstones_written(outcome: WriteOutcome, target: str) -> int:
    if outcome.poison:
        # A tombstone holds only a key the store already has: a refusal is the store's, never the record's.
        _, exc = outcome.poison[0]
        raise StoreRefusedError(f"{target} refused {len(outcome.poison)} truncate tombstone(s): {exc}")
    return outcome.written


# ---------------------------------------------------------------------------------------------------------------
# A target store


class TargetStore(Protocol):
    """A store the pipeline keeps in agreement with PostgreSQL. Everything store-specific the sync, the repair,
    the reconciliation and the Dagster definitions need is asked of this object, never of a store's name."""

    name: str  # "clickhouse": in DLQ headers, metadata, configuration choices
    title: str  # "ClickHouse": in messages
    shape: Shape  # which columns its canonical rows cover
    dlq_topic: str  # where records it refuses on their own go
    batch_size: int  # changes its sink takes per batch unless configured otherwise

    def holds(self, table: SyncedTable) -> bool:
        """Whether this store keeps a copy of `table` (a mirror, an index)."""
        ...

    def location(self, table: SyncedTable) -> str:
        """Where `table` lives in this store, as its operators name it (`knowton.users`, `knowton-users`)."""
        ...

    def connect(self, settings: Settings) -> AbstractContextManager[Any]:
        """A client of this store, closed on exit."""
        ...

    def writer(self, client: Any) -> Writer: ...

    def side(
        self, client: Any, table: SyncedTable, *, full: bool = False, progress: Callable[[int], None] | None = None
    ) -> Side:
        """`table` in this store as a reconciliation side. `full`: recompute every row's hash from the data itself
        where the fast path trusts what the writer stored."""
        ...

    def newest_versions(self, client: Any) -> dict[str, int]:
        """The highest version this store holds per table (0 when empty), tombstones included."""
        ...

    def apply_schema(self, client: Any) -> Iterator[str]:
        """Create or converge this store's schema (idempotent); yields a line per step."""
        ...

    def schema_errors(self, client: Any, table: SyncedTable) -> list[str]:
        """What in this store's copy of `table` contradicts the catalog (a missing or retyped column or field)."""
        ...

    def purge_tombstones(self, client: Any, table: SyncedTable, below_version: int) -> int:
        """Physically remove the deletes of `table` versioned below `below_version` (and the older rows of those
        keys); a key written again at or above it stays. Returns how many keys were removed."""
        ...

    def storage(self, client: Any, table: SyncedTable) -> dict[str, int]:
        """What this store keeps of `table`: `rows` (tombstones included), `tombstones`, `bytes`."""
        ...

    def make_visible(self, client: Any, table: SyncedTable) -> None:
        """Make what was just written visible to the next read (a repair's re-verification)."""
        ...
