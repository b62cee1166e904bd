"""Full rebuild of a search index into a new versioned index, then an atomic alias swap.

Search never sees a half-built index: the alias moves in one `_aliases` call once the new index
holds every row. Changes that CDC wrote to the old index while the rebuild ran (their `pg_lsn` is
above the rebuild's snapshot) are copied across before and again just after the swap, with the
same external versions, so nothing written during the rebuild is lost.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from elasticsearch import Elasticsearch, helpers

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.schema import alias_body
from knowton_pipeline.lib.sync.backfill import BackfillStats, backfill_range
from knowton_pipeline.lib.sync.writers import ElasticsearchWriter

ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


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


def _newer_documents(es: Elasticsearch, index: str, above_lsn: int) -> Iterator[dict[str, Any]]:
    """Documents (tombstones too) written to `index` with a version above `above_lsn`."""
    yield from helpers.scan(
        es, index=index, query={"query": {"range": {"pg_lsn": {"gt": above_lsn}}}}, size=2000, preserve_order=False
    )


def _copy_newer(es: Elasticsearch, source: str, target: str, above_lsn: int) -> int:
    actions = (
        {
            "_op_type": "index",
            "_index": target,
            "_id": hit["_id"],
            "version": hit["_source"]["pg_lsn"],
            "version_type": "external_gte",
            "_source": hit["_source"],
        }
        for hit in _newer_documents(es, source, above_lsn)
    )
    # A 409 means the new index already holds that version or a newer one: nothing to copy.
    ok, errors = helpers.bulk(es, actions, raise_on_error=False, chunk_size=2000)
    real = [e for e in errors if next(iter(e.values())).get("status") != 409]  # type: ignore[union-attr]
    if real:
        raise RebuildError(f"{len(real)} document(s) could not be copied from {source} to {target}: {real[:3]}")
    return ok


def rebuild_index(
    conn: psycopg.Connection,
    es: Elasticsearch,
    table: SyncedTable,
    *,
    on_progress: Callable[[BackfillStats], None] | None = None,
    before_swap: Callable[[], Any] | None = None,
) -> RebuildResult:
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
        stats = backfill_range(conn, table, *ALL_TIME, writer, on_progress=on_progress)
        copied = 0
        if old is not None:
            es.indices.refresh(index=old)
            copied += _copy_newer(es, old, new, stats.snapshot_lsn)
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
        # Writes that resolved the alias just before the swap may have landed in the old index.
        time.sleep(1.0)
        es.indices.refresh(index=old)
        copied += _copy_newer(es, old, new, stats.snapshot_lsn)
        es.indices.delete(index=old)
    es.indices.refresh(index=new)
    return RebuildResult(alias, old, new, stats.rows, copied, stats.snapshot_lsn, time.monotonic() - t0)
