"""Backfill: re-sync rows of chosen days from PostgreSQL through the one transform.

A mirror is backfilled column-wise inside the stores: PostgreSQL spells each row as the mirror's JSON (Python
writes only jsonb's canonical text into it) and ClickHouse parses blocks of them, with the row-by-row transform as
the way for rows either refuses. A search index is backfilled with documents PostgreSQL spells the same way (Python
adds the metadata and the hash), with the row-by-row transform for the rows that spelling leaves to it.

Rows are read in one consistent snapshot and written with its LSN as their version, so a backfill
racing with live CDC never overwrites a newer change, and never brings back a deleted row (a
deleted row is not in the snapshot, and the delete's tombstone carries a higher version).
Streaming (server-side cursor, fixed-size chunks) keeps memory bounded whatever the range.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.stores import Prepared, WriteItem, WriteOutcome
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.stores.postgres import (
    DocumentRecords,
    MirrorRecords,
    document_rows_copy_sql,
    documents_by_copy,
    mirror_rows_copy_sql,
)
from knowton_pipeline.lib.sync.snapshot import consistent_snapshot
from knowton_pipeline.lib.sync.source import split_enrichment, stream_rows
from knowton_pipeline.lib.transform import document_id

T = TypeVar("T")


class BackfillError(RuntimeError):
    """Some rows could not be written; the message lists their keys (the others were written)."""


@dataclass
class BackfillStats:
    rows: int = 0
    written: int = 0
    stale: int = 0
    snapshot_lsn: int = 0
    seconds: float = 0.0
    failed_keys: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def count(self, outcome: WriteOutcome) -> None:
        """Add what a write did (the rows it was given are counted by the caller)."""
        self.written += outcome.written
        self.stale += outcome.stale
        self.failed_keys += [str(item.sources[0]) for item, _ in outcome.poison]


def _send_ahead(
    batches: Iterator[tuple[int, Prepared]],
    writer: ClickHouseWriter | ElasticsearchWriter,
    stats: BackfillStats,
    t0: float,
    on_progress: Callable[[BackfillStats], None] | None,
    *,
    name: str,
) -> None:
    """Send each (rows, prepared batch) while the next is read and prepared on a second thread, one batch ahead: the
    store's round trips and PostgreSQL's overlap instead of adding up."""
    for n, batch in _ahead(batches, name=name):
        stats.count(writer.send(batch))
        stats.rows += n
        stats.seconds = time.monotonic() - t0
        if on_progress:
            on_progress(stats)


def backfill_range(
    conn: psycopg.Connection,
    table: SyncedTable,
    start: datetime | None,
    end: datetime | None,
    writer: ClickHouseWriter | ElasticsearchWriter,
    *,
    chunk: int = 5000,
    on_progress: Callable[[BackfillStats], None] | None = None,
) -> BackfillStats:
    """Write every row of `table` created in [start, end) to one target, versioned at the snapshot.

    A bound left None is open: with both None every row is written, whatever its creation time (a full
    rebuild must not depend on which dates a range can spell)."""
    if table.created_at is None and (start is not None or end is not None):
        raise ValueError(f"{table.name} has no creation-time column to backfill by")
    stats = BackfillStats()
    t0 = time.monotonic()
    conditions: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[datetime] = []
    for op, bound in ((">=", start), ("<", end)):
        if bound is not None:
            conditions.append(sql.SQL("t.{} {} %s").format(sql.Identifier(table.created_at or ""), sql.SQL(op)))
            params.append(bound)
    where = sql.SQL(" AND ").join(conditions)
    # A writer that takes rows spelled by PostgreSQL (a mirror's); refused rows are found again by their one key.
    if callable(getattr(writer, "insert_json_rows", None)) and len(table.key) == 1:
        _copy_to_mirror(conn, table, where, params, writer, chunk=chunk, stats=stats, on_progress=on_progress)
        stats.seconds = time.monotonic() - t0
        _raise_failed(table, stats)
        return stats
    # A writer that takes documents PostgreSQL spelled (a search index's).
    if callable(getattr(writer, "prepare_documents", None)) and documents_by_copy(table):
        _copy_to_index(conn, table, where, params, writer, chunk=chunk, stats=stats, on_progress=on_progress)
        stats.seconds = time.monotonic() - t0
        _raise_failed(table, stats)
        return stats
    enriched = writer.enriched_rows

    def prepared() -> Iterator[tuple[int, Prepared]]:
        with consistent_snapshot(conn) as lsn:
            stats.snapshot_lsn = lsn
            for rows in stream_rows(conn, table, where, params, chunk=chunk, enriched=enriched):
                items = []
                for raw in rows:
                    row, enrichment = split_enrichment(table, raw)
                    source = document_id(table, [row[k] for k in table.key])
                    items.append(WriteItem(table, row, lsn, False, (source,), enrichment or None))
                yield len(rows), writer.prepare(items)

    _send_ahead(prepared(), writer, stats, t0, on_progress, name=f"backfill-{table.name}")
    stats.seconds = time.monotonic() - t0
    _raise_failed(table, stats)
    return stats


def _ahead(items: Iterator[T], *, name: str) -> Iterator[T]:
    """`items`, computed on a thread up to two items ahead of the caller (which bounds memory). A caller that stops
    early, on an error, stops the thread: the generator is closed there, releasing what it holds (a snapshot)."""
    ready: queue.Queue[T | BaseException | object] = queue.Queue(maxsize=2)
    end, stop = object(), threading.Event()

    def run() -> None:
        try:
            for item in items:
                ready.put(item)
                if stop.is_set():
                    break
            ready.put(end)
        except BaseException as exc:  # raised on the caller's thread
            ready.put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not end:
            if isinstance(got, BaseException):
                raise got
            yield got  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


def _raise_failed(table: SyncedTable, stats: BackfillStats) -> None:
    if stats.failed_keys:
        sample = ", ".join(stats.failed_keys[:20])
        raise BackfillError(f"{len(stats.failed_keys)} row(s) of {table.name} could not be written (keys: {sample})")


def _copy_to_mirror(
    conn: psycopg.Connection,
    table: SyncedTable,
    where: sql.Composable,
    params: Sequence[Any],
    writer: ClickHouseWriter,
    *,
    chunk: int,
    stats: BackfillStats,
    on_progress: Callable[[BackfillStats], None] | None,
) -> None:
    """A mirror's backfill, column-wise in the stores: PostgreSQL spells each row as the mirror's JSON in a COPY
    (Python only writes jsonb's canonical text into it) and ClickHouse parses the blocks (JSONCompactEachRow), so no row
    passes through Python objects. The COPY is read on a second thread while the blocks before are inserted, so
    PostgreSQL, Python and ClickHouse work at once. A block ClickHouse refuses for a value, or a row whose jsonb the
    transform refuses, is written again row by row through the one transform, after the COPY, in the same
    snapshot: the rows at fault are found and reported, the others written. A store that is down or refuses the
    write as such stops the backfill at once, as the row-by-row way does."""
    t0 = time.monotonic()
    records = MirrorRecords(table)
    refused: list[Any] = []  # keys of the rows to write row by row: in blocks ClickHouse refused...
    unspelled: list[Any] = []  # ...or whose jsonb the transform refused (found on the reading thread)

    def flush(block: list[bytes]) -> None:
        if writer.insert_json_rows(table, records.columns, b"".join(block)):
            stats.written += len(block)
        else:
            refused.extend(records.key(line) for line in block)
        stats.rows += len(block)
        stats.seconds = time.monotonic() - t0
        if on_progress:
            on_progress(stats)

    with consistent_snapshot(conn) as lsn:
        stats.snapshot_lsn = lsn

        def blocks() -> Iterator[list[bytes]]:
            block: list[bytes] = []
            with conn.cursor() as cur, cur.copy(mirror_rows_copy_sql(table, where, lsn), params) as copy:
                for data in copy:  # one row per record of a COPY TO
                    record = bytes(data)
                    try:
                        block.append(records.line(record))
                    except ValueError:
                        unspelled.append(records.key(record))
                    if len(block) >= chunk:
                        yield block
                        block = []
            if block:
                yield block

        for block in _ahead(blocks(), name=f"backfill-copy-{table.name}"):
            flush(block)
        stats.rows += len(unspelled)
        _rows_again(conn, table, [*refused, *unspelled], lsn, writer, chunk=chunk, stats=stats)


def _rows_again(
    conn: psycopg.Connection,
    table: SyncedTable,
    keys: Sequence[Any],
    lsn: int,
    writer: ClickHouseWriter | ElasticsearchWriter,
    *,
    chunk: int,
    stats: BackfillStats,
) -> None:
    """Write the rows of `keys` (one key column) the row-by-row way, in the snapshot of `lsn` the caller holds: the
    one transform decides each row, and the rows it or the store refuse are reported."""
    [key] = table.key
    key_is = sql.SQL("t.{} = ANY(%s)").format(sql.Identifier(key))
    for start in range(0, len(keys), chunk):
        wanted = (list(keys[start : start + chunk]),)
        for rows in stream_rows(conn, table, key_is, wanted, chunk=chunk, enriched=writer.enriched_rows):
            items = []
            for raw in rows:
                row, enrichment = split_enrichment(table, raw)
                items.append(WriteItem(table, row, lsn, False, (document_id(table, [row[key]]),), enrichment or None))
            stats.count(writer.send(writer.prepare(items)))


def _copy_to_index(
    conn: psycopg.Connection,
    table: SyncedTable,
    where: sql.Composable,
    params: Sequence[Any],
    writer: ElasticsearchWriter,
    *,
    chunk: int,
    stats: BackfillStats,
    on_progress: Callable[[BackfillStats], None] | None,
) -> None:
    """A search index's backfill with the documents spelled by PostgreSQL: a COPY gives each row's column and derived
    fields as the document's JSON, so no row passes through psycopg's types and `to_es_document`; Python adds the
    metadata and the hash (from the document, as every write does). The COPY is read and the bulk requests built on
    a second thread while the ones before are sent. A row the COPY leaves to the transform, or whose jsonb it must
    read itself, is written row by row after the COPY, in the same snapshot, where the one transform decides it."""
    t0 = time.monotonic()
    records = DocumentRecords(table)
    unspelled: list[Any] = []  # keys of the rows to write row by row (found on the reading thread)
    indexed_at = datetime.now(UTC)
    with consistent_snapshot(conn) as lsn:
        stats.snapshot_lsn = lsn

        def batches() -> Iterator[tuple[int, Prepared]]:
            documents: list[dict[str, Any]] = []
            with conn.cursor() as cur, cur.copy(document_rows_copy_sql(table, where), params) as copy:
                for data in copy:  # one row per record of a COPY TO
                    record = bytes(data)
                    try:
                        documents.append(records.fields(record))
                    except ValueError:
                        unspelled.append(records.key(record))
                    if len(documents) >= chunk:
                        yield (
                            len(documents),
                            writer.prepare_documents(table, documents, version=lsn, indexed_at=indexed_at),
                        )
                        documents = []
            if documents:
                yield len(documents), writer.prepare_documents(table, documents, version=lsn, indexed_at=indexed_at)

        _send_ahead(batches(), writer, stats, t0, on_progress, name=f"backfill-copy-{table.name}")
        stats.rows += len(unspelled)
        _rows_again(conn, table, unspelled, lsn, writer, chunk=chunk, stats=stats)
