"""Full rebuild of a search index into a new versioned index, then an atomic alias swap.

Search never sees a half-built index: the alias moves in one `_aliases` call once the new index
holds every row of the table (no date range: a row created in 1960 is copied too). CDC writes through
the alias, so until the swap its changes land in the old index. They are caught up by comparing
versions: a document of the old index versioned above the rebuild's snapshot that the new index lacks,
or holds at a lower version, is copied across with its external version (so a copy never overwrites
a newer write). That is done before the swap, and after it once the old index can no longer change:
every bulk request that may have resolved the alias to the old index has finished, and a write block
refuses anything else. Only when no document is behind is the old index deleted.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from elasticsearch import Elasticsearch, helpers

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.stores.elasticsearch import BULK_REQUEST_BYTES, ElasticsearchWriter, alias_body
from knowton_pipeline.lib.sync.backfill import BackfillStats, backfill_range

BULK_ACTIONS = "indices:data/write/bulk*"
CATCH_UP_PASSES = 5  # the old index is write-blocked by then: the second pass finds nothing behind
COMPARE_BATCH = 1000


class RebuildError(RuntimeError):
    """The rebuild could not complete; the alias still points at the old index."""


@dataclass
class RebuildResult:
    alias: str
    old_index: str | None
    new_index: str
    rows: int
    copied_during_rebuild: int
    snapshot_lsn: int
    seconds: float


def next_index_name(alias: str, current: str | None) -> str:
    match = re.fullmatch(rf"{re.escape(alias)}-v(\d+)", current or "")
    return f"{alias}-v{int(match.group(1)) + 1 if match else 1}"


def _behind(es: Elasticsearch, source: str, target: str, above_lsn: int) -> Iterator[dict[str, Any]]:
    """Documents (tombstones too) of `source` versioned above `above_lsn` that `target` lacks or holds at a
    lower version."""
    hits = helpers.scan(
        es,
        index=source,
        query={"query": {"range": {"pg_lsn": {"gt": above_lsn}}}},
        size=COMPARE_BATCH,
        preserve_order=False,
        version=True,
    )
    batch: list[dict[str, Any]] = []
    for hit in hits:
        batch.append(hit)
        if len(batch) == COMPARE_BATCH:
            yield from _lower_in(es, target, batch)
            batch = []
    yield from _lower_in(es, target, batch)


def _lower_in(es: Elasticsearch, target: str, hits: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if not hits:
        return
    # A get is real-time: no refresh of the target is needed to see what was just written to it.
    found = es.mget(index=target, ids=[h["_id"] for h in hits], source=False)["docs"]
    for hit, doc in zip(hits, found, strict=True):
        if not doc.get("found") or doc["_version"] < hit["_version"]:
            yield hit


def _copy_behind(es: Elasticsearch, source: str, target: str, above_lsn: int) -> int:
    """One pass: copy what `target` misses of `source`, with the source's versions. Returns how many."""
    es.indices.refresh(index=source)
    actions = (
        {
            "_op_type": "index",
            "_index": target,
            "_id": hit["_id"],
            "version": hit["_version"],
            "version_type": "external_gte",
            "_source": hit["_source"],
        }
        for hit in _behind(es, source, target, above_lsn)
    )
    # A 409 means the target got that version or a newer one in the meantime: nothing to copy.
    ok, errors = helpers.bulk(es, actions, raise_on_error=False, chunk_size=2000, max_chunk_bytes=BULK_REQUEST_BYTES)
    real = [e for e in errors if next(iter(e.values())).get("status") != 409]  # type: ignore[union-attr]
    if real:
        raise RebuildError(f"{len(real)} document(s) could not be copied from {source} to {target}: {real[:3]}")
    return ok


def _wait_for_bulks_under_way(es: Elasticsearch, timeout_seconds: float) -> None:
    """Wait until every bulk request under way now has finished.

    Called just after the alias swap was acknowledged: a bulk that started before it may have resolved the
    alias to the old index, one that starts after it cannot, so once these are done nothing more can
    reach the old index through the alias."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the task list is flagged "technical preview" by the client
        # A bulk still under way after the timeout is left to the write block that follows: refused there
        # (a store-wide refusal), its writer retries the batch, which then resolves the alias to the new index.
        es.options(request_timeout=timeout_seconds + 30).tasks.list(
            actions=BULK_ACTIONS, wait_for_completion=True, timeout=f"{int(timeout_seconds)}s"
        )


def _catch_up(es: Elasticsearch, old: str, new: str, above_lsn: int) -> int:
    """Copy from the write-blocked old index until no document is behind in the new one."""
    copied = 0
    for _ in range(CATCH_UP_PASSES):
        n = _copy_behind(es, old, new, above_lsn)
        if n == 0:
            return copied
        copied += n
    raise RebuildError(
        f"{old} still holds documents newer than {new} after {CATCH_UP_PASSES} passes; the alias points at "
        f"{new} and {old} is kept (write-blocked) until they are copied"
    )


def rebuild_index(
    conn: psycopg.Connection,
    es: Elasticsearch,
    table: SyncedTable,
    *,
    on_progress: Callable[[BackfillStats], None] | None = None,
    before_swap: Callable[[], Any] | None = None,
    bulk_wait_seconds: float = 120.0,
) -> RebuildResult:
    """Rebuild `table`'s search index into a new index and point its alias at it.

    `before_swap` runs just before the alias moves (tests use it to write at that moment)."""
    alias = table.elasticsearch_index
    if alias is None:
        raise ValueError(f"{table.name} has no search index")
    t0 = time.monotonic()
    current = list(es.indices.get_alias(name=alias)) if es.indices.exists_alias(name=alias) else []
    if len(current) > 1:
        raise RebuildError(f"alias {alias} points at several indices ({', '.join(current)}); fix it by hand first")
    old = current[0] if current else None
    new = next_index_name(alias, old)
    if es.indices.exists(index=new):
        raise RebuildError(f"{new} already exists (an interrupted rebuild?); delete it and run again")
    es.indices.create(index=new, settings={"index": {"refresh_interval": "-1"}})
    try:
        writer = ElasticsearchWriter(es, index_names={alias: new})
        stats = backfill_range(conn, table, None, None, writer, on_progress=on_progress)
        copied = 0
        if old is not None:
            # CDC still writes to the old index: this pass only makes the one after the swap short.
            copied += _copy_behind(es, old, new, stats.snapshot_lsn)
        es.indices.put_settings(index=new, settings={"index": {"refresh_interval": None}})
        es.indices.refresh(index=new)
        if before_swap:
            before_swap()
        actions: list[dict[str, Any]] = [{"add": {"index": new, "alias": alias, **alias_body()}}]
        if old is not None:
            actions.insert(0, {"remove": {"index": old, "alias": alias}})
        es.indices.update_aliases(actions=actions)
    except BaseException:
        es.options(ignore_status=404).indices.delete(index=new)
        raise
    if old is not None:
        _wait_for_bulks_under_way(es, bulk_wait_seconds)
        # Waits for the writes in progress on the old index and refuses any later one (written to it by
        # name, not through the alias): from here on the old index cannot change, so the catch-up is final.
        es.indices.add_block(index=old, block="write")
        copied += _catch_up(es, old, new, stats.snapshot_lsn)
        es.indices.delete(index=old)
    es.indices.refresh(index=new)
    return RebuildResult(alias, old, new, stats.rows, copied, stats.snapshot_lsn, time.monotonic() - t0)
