"""The stores, one module each (`postgres`, `clickhouse`, `elasticsearch`), and the registry of target stores.

PostgreSQL is the source; every other store is a target, registered here once. The sync, the repair, the
reconciliation and the Dagster definitions loop over `TARGETS` and ask each store what they need (see
`base.TargetStore`); adding a store is a module with a `TargetStore` and one line below.
"""

from __future__ import annotations

from knowton_pipeline.catalog import SyncedTable
from knowton_pipeline.lib.stores.base import (
    Prepared,
    Side,
    StoreRefusedError,
    TargetStore,
    TransientStoreError,
    WriteItem,
    WriteOutcome,
    Writer,
)
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH

TARGETS: dict[str, TargetStore] = {store.name: store for store in (CLICKHOUSE, ELASTICSEARCH)}


class UnknownTargetError(ValueError):
    def __str__(self) -> str:
        return f"unknown target {self.args[0]!r}; targets are: {', '.join(TARGETS)}"


def target_store(name: str) -> TargetStore:
    """The target store called `name`, or a clear error naming the ones there are."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTargetError(name) from None


def targets_of(table: SyncedTable) -> list[TargetStore]:
    """The target stores that keep a copy of `table`."""
    return [store for store in TARGETS.values() if store.holds(table)]


__all__ = [
    "TARGETS",
    "Prepared",
    "Side",
    "StoreRefusedError",
    "TargetStore",
    "TransientStoreError",
    "UnknownTargetError",
    "WriteItem",
    "WriteOutcome",
    "Writer",
    "target_store",
    "targets_of",
]
