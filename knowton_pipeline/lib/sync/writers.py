"""Versioned, idempotent batch writes to the ClickHouse mirrors and the Elasticsearch indices.

A write either succeeds, is refused for good (poison: returned to the caller for the DLQ), or the
store is unavailable or refuses writes store-wide (TransientStoreError: the caller retries the whole batch,
which is harmless because every write carries its version).

Errors are classified by their cause, never by how many rows of a batch failed: a record is poison only when
the store names something about that record (a value it cannot parse or hold); a write block, a closed or
missing index or table, too many parts, a memory limit, a read-only replica, and any error the writer does not
recognise hold the batch and are retried. An unknown error therefore stops the sync visibly (lag grows, the
run fails after its retry budget) instead of sending good records to the DLQ.
"""

from __future__ import annotations

import json
import re
import struct
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
from elasticsearch import helpers as es_helpers

from knowton_pipeline.catalog import CLICKHOUSE_DATABASE, SyncedTable
from knowton_pipeline.lib.canonical import backtick, es_hash_fields
from knowton_pipeline.lib.transform import (
    ES_DELETED_FIELD,
    ES_VERSION_FIELD,
    clickhouse_columns,
    document_id,
    to_clickhouse_row,
    to_es_document,
)


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


# ClickHouse errors that are about the values of the rows sent (so about one record), by error name. Every
# other server error (UNKNOWN_TABLE, TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED, TABLE_IS_READ_ONLY, READONLY,
# NOT_ENOUGH_SPACE, ...) concerns the table or the server and holds the batch.
CLICKHOUSE_ROW_ERRORS = frozenset(
    {
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_PARSE_QUOTED_STRING",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_ESCAPE_SEQUENCE",
        "CANNOT_READ_ARRAY_FROM_TEXT",
        "CANNOT_CONVERT_TYPE",
        "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
        "ARGUMENT_OUT_OF_BOUND",
        "DECIMAL_OVERFLOW",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        "TOO_LARGE_STRING_SIZE",
        "TOO_LARGE_ARRAY_SIZE",
        "INCORRECT_DATA",
        "TYPE_MISMATCH",
    }
)
_CLICKHOUSE_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
# Raised while clickhouse-connect serialises a value on the client: always about that value.
_CLIENT_VALUE_ERRORS = (ch_errors.DataError, TypeError, ValueError, AttributeError, OverflowError, struct.error)


def clickhouse_error_name(exc: BaseException) -> str | None:
    """The error name a ClickHouse server error carries ("... (UNKNOWN_TABLE)"), None when it has none."""
    names = _CLICKHOUSE_ERROR_NAME.findall(str(exc))
    return names[-1] if names else None


def clickhouse_fault(exc: BaseException) -> str:
    """Whether `exc` is about the values of the rows sent ("row") or the store refuses the write as such ("store")."""
    if isinstance(exc, _CLIENT_VALUE_ERRORS):
        return "row"
    if isinstance(exc, ch_errors.DatabaseError) and clickhouse_error_name(exc) in CLICKHOUSE_ROW_ERRORS:
        return "row"
    return "store"


def _clickhouse_store_error(target: str, exc: BaseException) -> TransientStoreError:
    if _is_transient_clickhouse(exc):
        return TransientStoreError(f"ClickHouse unavailable: {type(exc).__name__}: {exc}")
    name = clickhouse_error_name(exc) or type(exc).__name__
    return StoreRefusedError(f"ClickHouse refuses writes to {target} ({name}); holding the batch: {exc}")


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

    def truncate(self, table: SyncedTable, version: int) -> int:
        """Every live row of the mirror older than `version` becomes a tombstone at `version` (a TRUNCATE)."""
        target = f"{self.database}.{table.clickhouse_table}"
        keys = ", ".join(backtick(table.column(k).target_name) for k in table.key)
        try:
            rows = self.client.query(
                f"SELECT {keys} FROM {target} FINAL WHERE version < {{v:UInt64}}", parameters={"v": version}
            ).result_rows
        except Exception as exc:
            raise _clickhouse_store_error(target, exc) from exc
        items = [WriteItem(table, dict(zip(table.key, r, strict=True)), version, True) for r in rows]
        return _tombstones_written(self.write(items), target)

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
            target = f"{self.database}.{table.clickhouse_table}"
            try:
                self._insert(table, [r for _, r in pairs])
                out.written += len(pairs)
                continue
            except Exception as exc:
                if clickhouse_fault(exc) == "store":
                    raise _clickhouse_store_error(target, exc) from exc
            # A value was refused: find the rows ClickHouse refuses on their own. A store-wide error met on the
            # way still holds the whole batch.
            for item, row in pairs:
                try:
                    self._insert(table, [row])
                    out.written += 1
                except Exception as exc:
                    if clickhouse_fault(exc) == "store":
                        raise _clickhouse_store_error(target, exc) from exc
                    out.poison.append((item, exc))
        return out


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """orjson for speed; the standard library for what orjson refuses (jsonb integers beyond 64 bits)."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


BULK_FILTER = "errors,items.*.status,items.*.error.type,items.*.error.reason"


# Bulk item errors that are about the document itself. Any other error (cluster_block_exception for a write
# block, index_closed_exception, index_not_found_exception, es_rejected_execution_exception,
# circuit_breaking_exception, unavailable shards, ...) concerns the index or the cluster and holds the batch.
ELASTICSEARCH_DOCUMENT_ERRORS = frozenset(
    {
        "mapper_parsing_exception",
        "document_parsing_exception",
        "strict_dynamic_mapping_exception",
        "illegal_argument_exception",
        "x_content_parse_exception",
        "json_parse_exception",
    }
)


def elasticsearch_fault(status: int, error_type: str | None) -> str:
    """A version conflict is "stale", an error about that document "document", anything else "store"."""
    if status == 409:
        return "stale"
    if status < 500 and error_type in ELASTICSEARCH_DOCUMENT_ERRORS:
        return "document"
    return "store"


class ElasticsearchWriter:
    enriched_rows = True

    def __init__(self, es: Elasticsearch, *, index_names: Mapping[str, str] | None = None):
        """`index_names` maps an alias to another index to write to (a rebuild or a benchmark)."""
        self.es = es
        self.index_names = dict(index_names or {})

    def write(self, items: Sequence[WriteItem], *, indexed_at: datetime | None = None) -> WriteOutcome:
        return self.send(self.prepare(items, indexed_at=indexed_at))

    def truncate(self, table: SyncedTable, version: int) -> int:
        """Every live document of the table's index older than `version` becomes a tombstone at `version`."""
        assert table.elasticsearch_index is not None
        index = self.index_names.get(table.elasticsearch_index, table.elasticsearch_index)
        fields = [table.column(k).target_name for k in table.key]
        query = {
            "bool": {
                "filter": [{"range": {ES_VERSION_FIELD: {"lt": version}}}],
                "must_not": [{"term": {ES_DELETED_FIELD: True}}],
            }
        }
        try:
            # The batch written just before must be visible to the scan.
            self.es.indices.refresh(index=index)
            hits = list(es_helpers.scan(self.es, index=index, query={"query": query}, _source=fields, size=5000))
        except (ApiError, elastic_transport.TransportError) as exc:
            raise StoreRefusedError(f"Elasticsearch could not list {index} for a truncate: {exc}") from exc
        items = [
            WriteItem(table, dict(zip(table.key, (h["_source"][f] for f in fields), strict=True)), version, True)
            for h in hits
        ]
        return _tombstones_written(self.write(items), index)

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
            # The request as a whole was refused: whatever the status, no single document is to blame.
            raise StoreRefusedError(f"Elasticsearch refused the bulk request (HTTP {exc.meta.status})") from exc
        except elastic_transport.TransportError as exc:
            raise TransientStoreError(f"Elasticsearch unavailable: {type(exc).__name__}") from exc
        refused: dict[str, int] = defaultdict(int)
        for item, result in zip(planned, response["items"], strict=True):
            r = result["index"]
            status = r.get("status", 500)
            if status < 300:
                out.written += 1
                continue
            error = r.get("error") or {}
            fault = elasticsearch_fault(status, error.get("type"))
            if fault == "stale":
                out.stale += 1
            elif fault == "document":
                out.poison.append((item, MappingRejectedError(f"{error.get('type')}: {error.get('reason')}")))
            else:
                refused[f"HTTP {status} {error.get('type') or 'error'}"] += 1
        if refused:
            causes = ", ".join(f"{n} x {cause}" for cause, n in sorted(refused.items()))
            raise StoreRefusedError(f"Elasticsearch refused document(s) store-wide ({causes}); holding the batch")
        return out


def _tombstones_written(outcome: WriteOutcome, target: str) -> int:
    if outcome.poison:
        # A tombstone holds only a key the store already has: a refusal is the store's, never the record's.
        _, exc = outcome.poison[0]
        raise StoreRefusedError(f"{target} refused {len(outcome.poison)} truncate tombstone(s): {exc}")
    return outcome.written


class MappingRejectedError(ValueError):
    """Elasticsearch refused a document for good (mapping or parsing error)."""
