"""A source that moved backwards (restored into a new cluster, its LSNs lower than the versions the stores hold)
stops the apply loudly with what to do, instead of every write being refused as stale in silence."""

from __future__ import annotations

import psycopg
import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from elasticsearch import Elasticsearch

from knowton_pipeline.catalog import table
from knowton_pipeline.lib.settings import Settings
from knowton_pipeline.lib.stores import WriteItem
from knowton_pipeline.lib.stores.clickhouse import ClickHouseWriter
from knowton_pipeline.lib.stores.elasticsearch import ElasticsearchWriter
from knowton_pipeline.lib.sync.positions import SourceBehindStoresError, check_source_not_behind, source_position
from knowton_pipeline_tests.helpers import make_applier, new_address


@pytest.mark.parametrize("store", ["clickhouse", "elasticsearch"])
def test_stores_ahead_of_the_source_stop_the_apply_with_the_procedure(
    store: str, caught_up: None, settings: Settings, pg: psycopg.Connection, ch: ClickHouseClient, es: Elasticsearch
) -> None:
    # What a restore looks like from the stores: a row written by the old cluster, far beyond this one's WAL.
    address = new_address()
    ahead = source_position(pg) + (1 << 40)
    user = table("User")
    row = {"address": address}
    writer = ClickHouseWriter(ch) if store == "clickhouse" else ElasticsearchWriter(es)
    assert writer.write([WriteItem(user, row, ahead, True)]).written == 1
    es.indices.refresh(index="knowton-users")
    try:
        with pytest.raises(SourceBehindStoresError, match=rf"{store} User at {ahead}.*restored"):
            make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=60)
    finally:
        if store == "clickhouse":
            ch.command("DELETE FROM knowton.users WHERE address = {a:String}", parameters={"a": address})
        else:
            es.delete(index="knowton-users", id=address, version=ahead + 1, version_type="external", refresh=True)
    make_applier(settings, ch, es).run(until_caught_up=True, max_seconds=60)  # back to normal


def test_a_source_ahead_of_every_store_passes() -> None:
    check_source_not_behind(100, {"clickhouse": {"User": 100, "Content": 0}, "elasticsearch": {"User": 99}})
    with pytest.raises(SourceBehindStoresError, match="elasticsearch User at 101"):
        check_source_not_behind(100, {"clickhouse": {"User": 100}, "elasticsearch": {"User": 101}})
