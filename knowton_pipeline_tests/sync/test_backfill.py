"""Backfills racing with live CDC: versioned at the snapshot LSN, they never overwrite a newer change
and never bring back a deleted row."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch
from psycopg import sql
from psycopg.types.json import Jsonb

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.clickhouse.mirrors import MirrorBackfillConfig, mirror_asset
from knowton_pipeline.defs.elasticsearch.indices import index_asset
from knowton_pipeline.defs.resources import build_resources
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import Prepared, WriteItem, WriteOutcome
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter, es_hash_fields
from knowton_pipeline.lib.stores.postgres import DocumentRecords, document_rows_copy_sql
from knowton_pipeline.lib.sync.apply import ApplyStats
from knowton_pipeline.lib.sync.backfill import BackfillError, backfill_range
from knowton_pipeline.lib.sync.source import split_enrichment, stream_rows
from knowton_pipeline.lib.transform import canonical_json, to_es_document
from knowton_pipeline_tests.helpers import ch_row, es_source, insert_content, insert_user, wait_for_cdc

USER = table("User")


def today() -> tuple[datetime, datetime]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


class RacingWriter:
    """Runs `race` after the backfill has read its rows and before it writes them."""

    def __init__(self, inner: ClickHouseWriter | ElasticsearchWriter, race: Callable[[], Any]):
        self.inner, self.race, self.raced = inner, race, False
        self.enriched_rows = inner.enriched_rows
        if isinstance(inner, ClickHouseWriter):  # a mirror's backfill sends PostgreSQL's JSON rows
            self.insert_json_rows = self._insert_json_rows
        else:  # a search index's backfill sends documents PostgreSQL spelled
            self.prepare_documents = inner.prepare_documents

    def _insert_json_rows(self, t: Any, columns: Sequence[str], block: bytes) -> bool:
        if not self.raced:
            self.raced = True
            self.race()
        assert isinstance(self.inner, ClickHouseWriter)
        return self.inner.insert_json_rows(t, columns, block)

    def prepare(self, items: Sequence[WriteItem]) -> Prepared:
        return self.inner.prepare(items)

    def send(self, prepared: Prepared) -> WriteOutcome:
        if not self.raced:
            self.raced = True
            self.race()
        return self.inner.send(prepared)


def writers(ch: ClickHouseClient, es: Elasticsearch) -> dict[str, ClickHouseWriter | ElasticsearchWriter]:
    return {"clickhouse": ClickHouseWriter(ch), "elasticsearch": ElasticsearchWriter(es)}


def state(target: str, ch: ClickHouseClient, es: Elasticsearch, address: str) -> dict[str, Any] | None:
    if target == "clickhouse":
        return ch_row(ch, "users", "address = {a:String}", {"a": address})
    es.indices.refresh(index="knowton-users")
    doc = es_source(es, "knowton-users", address)
    return None if doc is None or doc["is_deleted"] else doc


@pytest.mark.parametrize("target", ["clickhouse", "elasticsearch"])
def test_backfill_that_read_a_row_before_a_concurrent_update_does_not_overwrite_it(
    target: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg, reputation=1)
    apply()

    def concurrent_update() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as other:  # type: ignore[arg-type]
            other.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (address,))
        apply()
        assert state(target, ch, es, address)["reputation"] == 2  # type: ignore[index]

    racing = RacingWriter(writers(ch, es)[target], concurrent_update)
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        stats = backfill_range(conn, USER, *today(), racing)  # type: ignore[arg-type]
    assert racing.raced and stats.rows >= 1
    assert state(target, ch, es, address)["reputation"] == 2  # type: ignore[index]


@pytest.mark.parametrize("target", ["clickhouse", "elasticsearch"])
def test_backfill_never_brings_back_a_row_deleted_while_it_ran(
    target: str,
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    address = insert_user(pg)
    apply()

    def concurrent_delete() -> None:
        with psycopg.connect(**settings.pg_conninfo(), autocommit=True) as other:  # type: ignore[arg-type]
            other.execute('DELETE FROM "User" WHERE address = %s', (address,))
        apply()
        assert state(target, ch, es, address) is None

    racing = RacingWriter(writers(ch, es)[target], concurrent_delete)
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        backfill_range(conn, USER, *today(), racing)  # type: ignore[arg-type]
    assert racing.raced
    assert state(target, ch, es, address) is None
    # And a later backfill, whose snapshot no longer has the row, leaves it deleted too.
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        backfill_range(conn, USER, *today(), writers(ch, es)[target])
    assert state(target, ch, es, address) is None


def test_materializing_todays_partitions_backfills_rows_missing_from_both_stores(
    caught_up: None,
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
    es: Elasticsearch,
) -> None:
    creator = insert_user(pg, username=f"bf-{datetime.now(UTC).timestamp()}")
    content = insert_content(pg, creator, title="Backfilled")
    # Nothing applied them: only the backfill can bring them.
    partition = datetime.now(UTC).strftime("%Y-%m-%d")
    assets = [mirror_asset(table("Content")), index_asset(table("Content"))]
    result = dg.materialize(assets, partition_key=partition, resources=build_resources())
    assert result.success
    materializations = result.get_asset_materialization_events()
    assert len(materializations) == 2
    for event in materializations:
        metadata = event.materialization.metadata
        assert metadata["rows"].value >= 1 and metadata["snapshot_lsn"].value > 0
    assert ch_row(ch, "contents", "id = {i:Int64}", {"i": content})["title"] == "Backfilled"  # type: ignore[index]
    doc = es_source(es, "knowton-contents", str(content))
    assert doc is not None and doc["title"] == "Backfilled"
    assert doc["creator_username"].startswith("bf-")


def test_a_backfill_holding_the_embedded_engine_gives_the_clickhouse_sink_its_turns(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
) -> None:
    address = insert_user(pg, reputation=1)
    apply()
    pg.execute('UPDATE "User" SET reputation = 2 WHERE address = %s', (address,))  # a change while it runs
    wait_for_cdc(settings)
    mirror = mirror_asset(USER)
    # A day long past: the backfill itself never reads this row (created today); only the sink's turn brings it.
    result = dg.materialize(
        [mirror],
        partition_key="2025-01-02",
        resources=build_resources(),
        run_config=dg.RunConfig(ops={mirror.op.name: MirrorBackfillConfig(sink_turn_seconds=0.0)}),
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["sink_turns"].value >= 1
    assert event.materialization.metadata["cdc_events_applied_meanwhile"].value >= 1
    assert ch_row(ch, "users", "address = {a:String}", {"a": address})["reputation"] == 2  # type: ignore[index]


def backfill_contents_reporting_only(settings: Settings, ch: ClickHouseClient, bad: int) -> None:
    """Backfill today's contents into the mirror in blocks of two rows (so the bad row's block most likely holds a
    good one too) and check that the backfill reports exactly the row `bad`."""
    with (
        psycopg.connect(**settings.pg_conninfo()) as conn,  # type: ignore[arg-type]
        pytest.raises(BackfillError) as refused,
    ):
        backfill_range(conn, table("Content"), *today(), ClickHouseWriter(ch), chunk=2)
    assert str(refused.value).startswith("1 row(s) of Content could not be written") and str(bad) in str(refused.value)


def test_a_mirror_block_clickhouse_refuses_is_written_row_by_row_and_only_the_row_at_fault_is_reported(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
) -> None:
    creator = insert_user(pg)
    good = [insert_content(pg, creator, title=f"bf-good-{i}") for i in range(3)]
    bad = insert_content(pg, creator, title="bf-bad")
    # A NULL inside tags: PostgreSQL holds it, the mirror's transform refuses it (a text[] of strings).
    pg.execute('UPDATE "Content" SET tags = %s WHERE id = %s', (["a", None], bad))
    try:
        # Not applied: only the backfill can bring these rows; the good ones in the bad row's block go row by row.
        backfill_contents_reporting_only(settings, ch, bad)
        for key in good:
            assert ch_row(ch, "contents", "id = {i:Int64}", {"i": key})["title"] == f"bf-good-{good.index(key)}"  # type: ignore[index]
    finally:
        pg.execute('DELETE FROM "Content" WHERE id = %s', (bad,))
        apply()


def test_a_mirror_backfill_writes_jsonb_as_the_transform_does_and_a_jsonb_it_refuses_row_by_row(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    ch: ClickHouseClient,
) -> None:
    creator = insert_user(pg)
    metadata = [
        {"rating": 4.5, "pages": 12, "b": [1e-7, 1e16, 0.1], "a": {"z": None, "é": "x\ty"}},
        {"big": 2**70, "zero": -0.0, "s": 'q"\\'},
        [1.0, "🚀", {"k": True}],
    ]
    good = [insert_content(pg, creator, title=f"bf-json-{i}", metadata=Jsonb(m)) for i, m in enumerate(metadata)]
    bad = insert_content(pg, creator, title="bf-json-bad")
    # A fraction beyond a double: jsonb holds it, the transform refuses it (Python reads it as an infinity).
    beyond = "1" + "0" * 400 + ".5"
    pg.execute("""UPDATE "Content" SET metadata = jsonb_build_object('x', %s::numeric) WHERE id = %s""", (beyond, bad))
    try:
        backfill_contents_reporting_only(settings, ch, bad)
        for key in good:
            # What the row-by-row transform writes: jsonb as psycopg reads it (1e16 went in as an integer).
            [value] = pg.execute('SELECT metadata FROM "Content" WHERE id = %s', (key,)).fetchone()  # type: ignore[misc]
            row = ch_row(ch, "contents", "id = {i:Int64}", {"i": key})
            assert row is not None and row["metadata"] == canonical_json(value)
        assert ch_row(ch, "contents", "id = {i:Int64}", {"i": bad}) is None
    finally:
        pg.execute('DELETE FROM "Content" WHERE id = %s', (bad,))
        apply()


def test_a_search_backfill_writes_the_documents_the_transform_writes_and_leaves_what_it_cannot_spell_to_it(
    caught_up: None,
    apply: Callable[[], ApplyStats],
    settings: Settings,
    pg: psycopg.Connection,
    es: Elasticsearch,
) -> None:
    contents = table("Content")
    creator = insert_user(pg, username=f'bf "doc" \\ é {uuid.uuid4().hex[:8]}')
    spelled = {  # PostgreSQL spells these documents
        "escapes": {"title": 'tab\there "q" \\ 🚀', "description": None, "tags": []},
        "tags": {"tags": ["a,b", 'c"d', "{e}", "NULL", ""], "price": Decimal("0.10")},
        "json": {"metadata": Jsonb({"rating": 4.5, "a": {"z": None, "é": "x\ty"}, "l": [1, True, "s"]})},
    }
    by_transform = {  # its jsonb is left to the row-by-row transform: orjson might not read it as json.loads does
        "big": {"metadata": Jsonb({"big": 2**70})},
        "tiny": {"metadata": Jsonb({"tiny": 1e-7})},
    }
    keys = {name: insert_content(pg, creator, **values) for name, values in {**spelled, **by_transform}.items()}
    bad = insert_content(pg, creator, title="bf-doc-bad")
    # A fraction beyond a double: jsonb holds it, the transform refuses it (Python reads it as an infinity).
    pg.execute(
        """UPDATE "Content" SET metadata = jsonb_build_object('x', %s::numeric) WHERE id = %s""",
        ("1" + "0" * 400 + ".5", bad),
    )
    index = f"knowton-contents-bf-{uuid.uuid4().hex[:8]}"
    es.indices.create(index=index)  # the real template's strict mapping applies
    try:
        records = DocumentRecords(contents)
        where = sql.SQL("t.id = ANY(%s)")
        with pg.cursor() as cur, cur.copy(document_rows_copy_sql(contents, where), ([*keys.values(), bad],)) as copy:
            read = {records.key(bytes(r)): bytes(r) for r in copy}
        for name, key in keys.items():
            if name in spelled:
                assert records.fields(read[key])["id"] == key
            else:
                with pytest.raises(ValueError, match="left to the row-by-row transform"):
                    records.fields(read[key])

        writer = ElasticsearchWriter(es, index_names={"knowton-contents": index})
        with (
            psycopg.connect(**settings.pg_conninfo()) as conn,  # type: ignore[arg-type]
            pytest.raises(BackfillError) as refused,
        ):
            backfill_range(conn, contents, *today(), writer, chunk=2)
        assert str(refused.value).startswith("1 row(s) of Content could not be written") and str(bad) in str(
            refused.value
        )

        es.indices.refresh(index=index)
        with pg.transaction():
            rows = {
                r["id"]: r
                for chunk in stream_rows(pg, contents, where, (list(keys.values()),), enriched=True)
                for r in chunk
            }
        for name, key in keys.items():
            row, enrichment = split_enrichment(contents, rows[key])
            doc = es_source(es, index, str(key))
            assert doc is not None, name
            expected = to_es_document(
                contents, row, version=doc["pg_lsn"], deleted=False, indexed_at=datetime.now(UTC), enrichment=enrichment
            )
            expected.update(es_hash_fields(contents, expected))
            assert {k: v for k, v in doc.items() if k != "indexed_at"} == {
                k: v for k, v in expected.items() if k != "indexed_at"
            }, name
        assert es_source(es, index, str(bad)) is None
    finally:
        es.indices.delete(index=index, ignore_unavailable=True)
        pg.execute('DELETE FROM "Content" WHERE id = %s', (bad,))
        apply()
