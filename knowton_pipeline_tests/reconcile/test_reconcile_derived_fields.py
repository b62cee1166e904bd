"""A search document's derived fields (the creator's username, the sales count) are reconciled like its columns:
an edit made in the index and a missed re-enrichment are reported key-exactly with the field named, and repaired."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch
from psycopg import sql

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.reconcile.engine import ReconcileResult
from knowton_pipeline.lib.reconcile.repair import RepairResult
from knowton_pipeline.lib.reconcile.run import repair_pair, result_keys
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.elasticsearch import (
    ES_HASH_FIELD,
    ElasticsearchWriter,
    enrichment_from_es_source,
    row_from_es_source,
)
from knowton_pipeline.lib.stores.postgres import hash_sql as postgres_hash_sql
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline_tests.helpers import Reconcile, insert_content, insert_purchase, insert_user, new_keys

CONTENT = table("Content")
CONTENTS = "knowton-contents"
NOTHING_NEW: dict[str, Any] = {"missing": [], "extra": [], "different": {}}


def _repair(settings: Settings, ch: ClickHouseClient, es: Elasticsearch, result: ReconcileResult) -> RepairResult:
    with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        return repair_pair(
            result.table,
            result.target,
            result_keys(result),
            conn=conn,
            clients={"clickhouse": ch, "elasticsearch": es},
        )


def _source(es: Elasticsearch, content_id: int) -> dict[str, Any]:
    return es.get(index=CONTENTS, id=str(content_id))["_source"]


def _edit_by_hand(es: Elasticsearch, content_id: int, **fields: Any) -> None:
    """Change fields of a document in place, keeping its stored hash and its version (a partial update would bump
    the version past the LSN a repair snapshot may get when PostgreSQL has been idle since)."""
    found = es.get(index=CONTENTS, id=str(content_id))
    es.index(
        index=CONTENTS,
        id=str(content_id),
        document={**found["_source"], **fields},
        version=found["_version"],
        version_type="external_gte",
    )


def _postgres_hashes(pg: psycopg.Connection, ids: list[int]) -> dict[int, int]:
    """The hash PostgreSQL computes for each Content row with its derived fields, as the search document has it."""
    query = sql.SQL("SELECT t.id, {hash} FROM {rel} AS t WHERE t.id = ANY(%s)").format(
        hash=postgres_hash_sql(CONTENT, "t", shape="document"), rel=sql.Identifier(CONTENT.schema, CONTENT.name)
    )
    return {r[0]: r[1] for r in pg.execute(query, (ids,)).fetchall()}


def test_derived_fields_edited_in_the_index_are_reported_with_their_column_and_repaired(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    es: Elasticsearch,
    ch: ClickHouseClient,
    settings: Settings,
    reconcile: Reconcile,
) -> None:
    creator, buyer = insert_user(pg), insert_user(pg)
    contents = [insert_content(pg, creator, title=f"derived {i}") for i in range(8)]
    for content_id in contents[:5]:
        insert_purchase(pg, content_id, buyer)
    apply()
    before = reconcile("Content", "elasticsearch", mode="full")
    renamed, resold = contents[1], contents[4]
    username, sales = _source(es, renamed)["creator_username"], _source(es, resold)["sales_count"]
    assert (username, sales) == (f"u-{creator[2:14]}", 1)
    # Edits made directly in the index, one field each: the stored hashes stay as they were, as with a hand edit.
    _edit_by_hand(es, renamed, creator_username="edited by hand")
    _edit_by_hand(es, resold, sales_count=41)
    es.indices.refresh(index=CONTENTS)

    full = reconcile("Content", "elasticsearch", mode="full")
    assert new_keys(full, before) == {
        "missing": [],
        "extra": [],
        "different": {renamed: ["creator_username"], resold: ["sales_count"]},
    }
    assert full.columns.get("creator_username", 0) >= 1 and full.columns.get("sales_count", 0) >= 1

    repaired = _repair(settings, ch, es, full)
    assert repaired.verified
    assert reconcile("Content", "elasticsearch", mode="full").clean
    assert (_source(es, renamed)["creator_username"], _source(es, resold)["sales_count"]) == (username, sales)


def test_a_missed_re_enrichment_is_found_by_the_stored_hash_checksum_and_repaired(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    pg: psycopg.Connection,
    es: Elasticsearch,
    ch: ClickHouseClient,
    settings: Settings,
    reconcile: Reconcile,
) -> None:
    creator, buyer = insert_user(pg), insert_user(pg)
    contents = [insert_content(pg, creator, title=f"enriched {i}") for i in range(6)]
    apply()
    # The writer's stored hash covers the derived fields: it is the hash PostgreSQL computes for the document.
    assert {i: int(_source(es, i)[ES_HASH_FIELD]) for i in contents} == _postgres_hashes(pg, contents)
    before = reconcile("Content", "elasticsearch", mode="checksum")
    renamed, sold = contents[2], contents[3]
    former = {
        "creator_username": _source(es, renamed)["creator_username"],
        "sales_count": _source(es, sold)["sales_count"],
    }

    # The creator is renamed and a purchase completes; the pipeline re-enriches the documents...
    pg.execute('UPDATE "User" SET username = %s WHERE address = %s', (f"renamed-{creator[2:14]}", creator))
    insert_purchase(pg, sold, buyer)
    apply()
    assert _source(es, renamed)["creator_username"] == f"renamed-{creator[2:14]}"
    assert _source(es, sold)["sales_count"] == 1
    # ...then a write that missed the re-enrichment puts a former value back, through the writer (so its stored
    # hash matches its _source: only the comparison with PostgreSQL can tell), at the version the document has.
    items = []
    for content_id, field in ((renamed, "creator_username"), (sold, "sales_count")):
        current = _source(es, content_id)
        enrichment = {**enrichment_from_es_source(CONTENT, current), field: former[field]}
        row = row_from_es_source(CONTENT, current)
        items.append(WriteItem(CONTENT, row, current["pg_lsn"], False, enrichment=enrichment))
    assert ElasticsearchWriter(es).write(items).written == 2
    es.indices.refresh(index=CONTENTS)

    quick = reconcile("Content", "elasticsearch", mode="checksum")
    assert new_keys(quick, before) == {
        "missing": [],
        "extra": [],
        "different": {renamed: ["creator_username"], sold: ["sales_count"]},
    }

    repaired = _repair(settings, ch, es, quick)
    assert repaired.verified
    assert new_keys(reconcile("Content", "elasticsearch", mode="checksum"), before) == NOTHING_NEW
    assert reconcile("Content", "elasticsearch", mode="full").clean
    assert {i: int(_source(es, i)[ES_HASH_FIELD]) for i in contents} == _postgres_hashes(pg, contents)
