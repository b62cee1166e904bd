"""Versioned, idempotent batch writes to the ClickHouse mirrors and the Elasticsearch indices.

A write either succeeds, is refused for good (poison: returned to the caller for the DLQ), or the
store is unavailable (TransientStoreError: the caller retries the whole batch, which is harmless
because every write carries its version).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import elastic_transport
import orjson
from clickhouse_connect.driver import exceptions as ch_errors
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import ApiError, Elasticsearch

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, SyncedTable
from knowton_pipeline.lib.canonical import es_hash_fields
from knowton_pipeline.lib.transform import clickhouse_columns, document_id, to_clickhouse_row, to_es_document


class TransientStoreError(RuntimeError):
    """The store is down or overloaded: retry the batch later, do not dead-letter anything."""


@dataclass(frozen=True)
class WriteItem:
    table: SyncedTable
    row: Mapping[str, Any]
    version: int
    deleted: bool
    sources: tuple[Any, ...] = ()  # what to dead-letter if this item is poison (Kafka messages)
    enrichment: Mapping[str, Any] | None = None


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


def _is_transient_clickhouse(exc: BaseException) -> bool:
    return isinstance(exc, ch_errors.OperationalError | ch_errors.StreamFailureError | ConnectionError | OSError)


class ClickHouseWriter:
    # Mirrors hold the row as it is; search documents also show fields of other tables.
    enriched_rows = False

    def __init__(self, client: ClickHouseClient, database: str = CLICKHOUSE_DATABASE):
        self.client = client
        self.database = database

    def _insert(self, table: SyncedTable, rows: list[list[Any]]) -> None:
        self.client.insert(f"{self.database}.{table.clickhouse_table}", rows, column_names=clickhouse_columns(table))

    def write(self, items: Sequence[WriteItem]) -> WriteOutcome:
        return self.send(self.prepare(items))

    def prepare(self, items: Sequence[WriteItem]) -> Prepared:
        """Transform (CPU only, no I/O): can run on another thread while the previous batch is sent."""
        out = WriteOutcome()
        by_table: dict[str, list[tuple[WriteItem, list[Any]]]] = defaultdict(list)
        for item in items:
            try:
                by_table[item.table.name].append(
                    (item, to_clickhouse_row(item.table, item.row, version=item.version, deleted=item.deleted))
                )
            except (ValueError, TypeError, KeyError) as exc:
                out.poison.append((item, exc))
        return Prepared(out, by_table)

    def send(self, prepared: Prepared) -> WriteOutcome:
        out, by_table = prepared.outcome, prepared.payload
        for pairs in by_table.values():
            table = pairs[0][0].table
            try:
                self._insert(table, [r for _, r in pairs])
                out.written += len(pairs)
                continue
            except Exception as exc:
                if _is_transient_clickhouse(exc):
                    raise TransientStoreError(f"ClickHouse unavailable: {type(exc).__name__}: {exc}") from exc
                batch_error = exc
            # The batch was refused: find the rows ClickHouse refuses on their own.
            failed: list[tuple[WriteItem, BaseException]] = []
            for item, row in pairs:
                try:
                    self._insert(table, [row])
                    out.written += 1
                except Exception as exc:
                    if _is_transient_clickhouse(exc):
                        raise TransientStoreError(f"ClickHouse unavailable: {exc}") from exc
                    failed.append((item, exc))
            if failed and len(failed) == len(pairs) and len(pairs) > 1:
                # Every row refused alike: the table, not the data, is wrong (missing, wrong DDL).
                raise TransientStoreError(
                    f"ClickHouse refuses every row of {self.database}.{table.clickhouse_table}: {batch_error}"
                )
            out.poison.extend(failed)
        return out


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """orjson for speed; the standard library for what orjson refuses (jsonb integers beyond 64 bits)."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


BULK_FILTER = "errors,items.*.status,items.*.error.type,items.*.error.reason"


def _es_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


class ElasticsearchWriter:
    enriched_rows = True

    def __init__(self, es: Elasticsearch, *, index_names: Mapping[str, str] | None = None):
        """`index_names` maps an alias to another index to write to (a rebuild or a benchmark)."""
        self.es = es
        self.index_names = dict(index_names or {})

    def write(self, items: Sequence[WriteItem], *, indexed_at: datetime | None = None) -> WriteOutcome:
        return self.send(self.prepare(items, indexed_at=indexed_at))

    def prepare(self, items: Sequence[WriteItem], *, indexed_at: datetime | None = None) -> Prepared:
        """Transform (CPU only, no I/O): can run on another thread while the previous batch is sent."""
        out = WriteOutcome()
        now = indexed_at or datetime.now(UTC)
        operations: list[bytes] = []
        planned: list[WriteItem] = []
        for item in items:
            index = item.table.elasticsearch_index
            if index is None:
                continue
            index = self.index_names.get(index, index)
            try:
                doc = to_es_document(
                    item.table,
                    item.row,
                    version=item.version,
                    deleted=item.deleted,
                    indexed_at=now,
                    enrichment=item.enrichment,
                )
                if not item.deleted:
                    # What was written, hashed: a fast checksum of the index needs no document to travel.
                    doc.update(es_hash_fields(item.table, doc))
                key = tuple(item.row[k] for k in item.table.key)
                doc_id = document_id(item.table, key)
            except (ValueError, TypeError, KeyError) as exc:
                out.poison.append((item, exc))
                continue
            action = {
                "index": {"_index": index, "_id": doc_id, "version": item.version, "version_type": "external_gte"}
            }
            # Serialized here, on the preparing thread: the sending thread then only does I/O.
            operations.append(orjson.dumps(action) + b"\n" + _json_bytes(doc) + b"\n")
            planned.append(item)
        return Prepared(out, (b"".join(operations), planned))

    def send(self, prepared: Prepared) -> WriteOutcome:
        out = prepared.outcome
        operations, planned = prepared.payload
        if not operations:
            return out
        try:
            # Only what is read back: parsing full per-item results cost as much as building the request.
            response = self.es.bulk(operations=operations, refresh=False, filter_path=BULK_FILTER)
        except ApiError as exc:
            if _es_transient_status(exc.meta.status):
                raise TransientStoreError(f"Elasticsearch answered HTTP {exc.meta.status}") from exc
            raise
        except elastic_transport.TransportError as exc:
            raise TransientStoreError(f"Elasticsearch unavailable: {type(exc).__name__}") from exc
        transient = 0
        for item, result in zip(planned, response["items"], strict=True):
            r = result["index"]
            status = r.get("status", 500)
            if status < 300:
                out.written += 1
            elif status == 409:
                out.stale += 1
            elif _es_transient_status(status):
                transient += 1
            else:
                error = r.get("error", {})
                out.poison.append((item, MappingRejectedError(f"{error.get('type')}: {error.get('reason')}")))
        if transient:
            raise TransientStoreError(f"Elasticsearch rejected {transient} document(s) as overloaded or unavailable")
        return out


class MappingRejectedError(ValueError):
    """Elasticsearch refused a document for good (mapping or parsing error)."""
