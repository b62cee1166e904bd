"""The asset that stands for a table in each target store: a store added to the registry adds its entry here."""

import dagster as dg

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.defs.clickhouse.mirrors import mirror_key
from knowton_pipeline.defs.elasticsearch.indices import index_key
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH

_KEYS = {CLICKHOUSE.name: mirror_key, ELASTICSEARCH.name: index_key}


def store_asset_key(store: str, table: SyncedTable) -> dg.AssetKey:
    return _KEYS[store](table)
