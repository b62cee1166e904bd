"""Reconciliation as asset checks: every ClickHouse mirror, search index and aggregate against PostgreSQL.

One subsettable multi-asset check runs them; the `reconcile` job runs all of them (or the tables and
targets its run config names), `reconcile_hourly` incrementally and `reconcile_daily` in full. Drift
up to `error_above_keys` differing keys is a WARN, more is an ERROR; the keys go to ops.reconcile_diffs
and the `repair` job re-syncs exactly them.
"""

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.clickhouse.aggregates import aggregate_key
from knowton_pipeline.defs.clickhouse.mirrors import mirror_key
from knowton_pipeline.defs.elasticsearch.indices import index_key
from knowton_pipeline.defs.partitions import DAILY
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL, ClickHouseResource, ElasticsearchResource, PostgresResource
from knowton_pipeline.lib.aggregates import AGGREGATES
from knowton_pipeline.lib.reconcile.engine import MODES, ReconcileError, ReconcileOptions, ReconcileResult
from knowton_pipeline.lib.reconcile.record import key_text, load_differences, mark_repaired, record_result
from knowton_pipeline.lib.reconcile.run import (
    RepairCapError,
    is_aggregate,
    plan_pairs,
    reconcile_pair,
    recorded_keys,
    repair_pair,
    result_keys,
)

CHECK_NAME = "matches_postgres"
SAMPLE = 20


def pair_asset_key(name: str, target: str) -> dg.AssetKey:
    if is_aggregate(name):
        return aggregate_key(AGGREGATES[name])
    return index_key(table(name)) if target == "elasticsearch" else mirror_key(table(name))


def _pairs_by_check_key() -> dict[dg.AssetCheckKey, tuple[str, str]]:
    return {dg.AssetCheckKey(pair_asset_key(n, t), CHECK_NAME): (n, t) for n, t in plan_pairs()}


def _check_specs() -> list[dg.AssetCheckSpec]:
    specs = []
    for key, (name, _target) in _pairs_by_check_key().items():
        what = "the same aggregate computed by PostgreSQL, day by day" if is_aggregate(name) else f"PostgreSQL {name}"
        specs.append(
            dg.AssetCheckSpec(
                CHECK_NAME,
                asset=key.asset_key,
                description=(
                    f"Row counts and checksums of {key.asset_key.to_user_string()} match {what}; drift is listed "
                    "by key and column, WARN up to the configured number of keys, ERROR above."
                ),
            )
        )
    return specs


class ReconcileRunConfig(dg.Config):
    """Run config of the reconcile checks (`ops: {reconcile_stores: {config: ...}}`)."""

    mode: str = "checksum"  # incremental (rows changed in the window) | checksum | full (also hash search documents)
    tables: list[str] = Field(default_factory=list, description="User, Content, ...; empty: all, with aggregates")
    targets: list[str] = Field(default_factory=list, description="clickhouse, elasticsearch; empty: both")
    error_above_keys: int = 100  # more differing keys than this is an ERROR, fewer a WARN
    window_minutes: float = 60.0
    settle_seconds: float = 5.0
    # A key whose source changes while its target stands still this long is reported as lagging.
    stuck_seconds: float = 60.0
    threshold: int = 256
    aggregate_days: int = 0  # 0: every materialized day; N: the last N materialized days
    repair: bool = False  # re-sync the differing keys right after the check
    max_repair_keys: int = 1000


def _aggregate_days(context: dg.AssetCheckExecutionContext, name: str, config: ReconcileRunConfig) -> list[date]:
    """The materialized days of an aggregate (not today: it is still filling up)."""
    keys = context.instance.get_materialized_partitions(aggregate_key(AGGREGATES[name]))
    today = datetime.now(UTC).date()
    days = sorted(d for d in (DAILY.time_window_for_partition_key(k).start.date() for k in keys) if d < today)
    if config.mode == "incremental":
        days = [d for d in days if d >= today - timedelta(days=2)]
    if config.aggregate_days:
        days = days[-config.aggregate_days :]
    return days


def _metadata(result: ReconcileResult, reconcile_id: int, extra: dict[str, Any]) -> dict[str, Any]:
    d = result.differences
    sample = [*map(key_text, d.missing_in_target[:SAMPLE]), *map(key_text, d.extra_in_target[:SAMPLE])]
    sample += [f"{key_text(k)} ({', '.join(c)})" for k, c in list(d.different.items())[:SAMPLE]]
    return {
        "mode": result.mode,
        "source_rows": dg.IntMetadataValue(result.source_rows),
        "target_rows": dg.IntMetadataValue(result.target_rows),
        "differing_keys": dg.IntMetadataValue(d.total),
        "missing_in_target": dg.IntMetadataValue(len(d.missing_in_target)),
        "extra_in_target": dg.IntMetadataValue(len(d.extra_in_target)),
        "different": dg.IntMetadataValue(len(d.different)),
        "in_flight": dg.IntMetadataValue(len(result.in_flight)),
        "lagging": dg.IntMetadataValue(len(result.lagging)),
        "oldest_lagging_seconds": dg.FloatMetadataValue(round(max(result.lagging.values(), default=0.0), 1)),
        "days_with_count_mismatch": dg.IntMetadataValue(len(result.day_counts)),
        "rows_compared": dg.IntMetadataValue(result.stats.rows_compared),
        "duration_seconds": dg.FloatMetadataValue(round(result.seconds, 3)),
        "rows_per_second": dg.FloatMetadataValue(round(result.rows_per_second, 1)),
        "sample_keys": dg.MetadataValue.json(sample[:SAMPLE]),
        "differing_columns": dg.MetadataValue.json(result.columns),
        "reconcile_id": dg.IntMetadataValue(reconcile_id),
        **extra,
    }


def _repair(
    context: dg.AssetCheckExecutionContext,
    result: ReconcileResult,
    reconcile_id: int,
    conn: psycopg.Connection,
    ch: Any,
    es: Any,
    max_keys: int,
) -> dict[str, Any]:
    try:
        repaired = repair_pair(
            result.table, result.target, result_keys(result), conn=conn, clickhouse=ch, es=es, max_keys=max_keys
        )
    except RepairCapError as exc:
        context.log.warning(str(exc))
        return {"repair": dg.MetadataValue.text(f"skipped: {exc}")}
    mark_repaired(conn, reconcile_id, result_keys(result), repaired.still_different)
    context.log.info(f"repaired {repaired.requested} key(s) of {result.table} in {result.target}: {repaired.as_dict()}")
    return {
        "repaired_keys": dg.IntMetadataValue(repaired.requested),
        "still_different_after_repair": dg.IntMetadataValue(len(repaired.still_different)),
    }


@dg.multi_asset_check(
    specs=_check_specs(),
    can_subset=True,
    name="reconcile_stores",
    pool=CLICKHOUSE_POOL,
    description="Reconcile the ClickHouse mirrors, search indices and aggregates with PostgreSQL.",
)
def reconcile_stores(
    context: dg.AssetCheckExecutionContext,
    config: ReconcileRunConfig,
    postgres: PostgresResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> Iterator[dg.AssetCheckResult]:
    if config.mode not in MODES:
        raise dg.Failure(f"unknown mode {config.mode!r}; modes are: {', '.join(MODES)}")
    try:
        wanted = set(plan_pairs(config.tables or None, config.targets or None))
    except ValueError as exc:
        raise dg.Failure(str(exc)) from None
    pairs = _pairs_by_check_key()
    selected = [(k, pairs[k]) for k in sorted(context.selected_asset_check_keys, key=str) if pairs[k] in wanted]
    skipped = len(context.selected_asset_check_keys) - len(selected)
    if skipped:
        context.log.info(f"{skipped} check(s) left out by the run config's tables/targets")
    options = ReconcileOptions(
        mode=config.mode,  # type: ignore[arg-type]
        threshold=config.threshold,
        window=timedelta(minutes=config.window_minutes),
        settle_seconds=config.settle_seconds,
        stuck_seconds=config.stuck_seconds,
    )
    failed: list[str] = []
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        for i, (check_key, (name, target)) in enumerate(selected, 1):
            context.log.info(f"[{i}/{len(selected)}] reconciling {name} with {target} ({config.mode})")
            started = datetime.now(UTC)
            days = _aggregate_days(context, name, config) if is_aggregate(name) else None
            try:
                result = reconcile_pair(
                    name,
                    target,
                    conn=conn,
                    clickhouse=ch,
                    es=es,
                    options=options,
                    days=days,
                    on_progress=context.log.info,
                )
            except ReconcileError as exc:
                context.log.error(str(exc))
                failed.append(f"{name} -> {target}: {exc}")
                continue
            reconcile_id = record_result(conn, result, started_at=started, dagster_run_id=context.run.run_id)
            extra: dict[str, Any] = {}
            if days is not None:
                extra["days_compared"] = dg.IntMetadataValue(len(days))
            drift = result.differences.total
            if config.repair and drift:
                extra.update(_repair(context, result, reconcile_id, conn, ch, es, config.max_repair_keys))
            severity = dg.AssetCheckSeverity.ERROR if drift > config.error_above_keys else dg.AssetCheckSeverity.WARN
            yield dg.AssetCheckResult(
                asset_key=check_key.asset_key,
                check_name=CHECK_NAME,
                passed=drift == 0,
                severity=severity,
                description=(
                    f"{name} matches PostgreSQL ({result.source_rows} rows)"
                    if drift == 0
                    else f"{drift} differing key(s) between PostgreSQL and {target}; see ops.reconcile_diffs "
                    f"(reconcile_id {reconcile_id})"
                ),
                metadata=_metadata(result, reconcile_id, extra),
            )
    if failed:
        # No verdict for these: a store failed mid-run, and a partial result is not presented as one.
        raise dg.Failure(f"{len(failed)} reconciliation(s) could not finish", description="\n".join(failed))


reconcile_job = dg.define_asset_job(
    "reconcile",
    selection=dg.AssetSelection.checks(reconcile_stores),
    description="Reconcile every mirror, index and aggregate with PostgreSQL (run config narrows tables/targets).",
)


def _schedule(name: str, cron: str, mode: str, description: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        job=reconcile_job,
        cron_schedule=cron,
        execution_timezone="UTC",
        run_config=dg.RunConfig(ops={"reconcile_stores": ReconcileRunConfig(mode=mode)}),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )


reconcile_hourly = _schedule(
    "reconcile_hourly", "5 * * * *", "incremental", "Rows changed in the last hour (plus a margin), every hour."
)
reconcile_daily = _schedule("reconcile_daily", "30 3 * * *", "full", "Every row and every search document, daily.")


class RepairRunConfig(dg.Config):
    """Which recorded reconciliation to repair: an id, or the latest of each selected table and target."""

    reconcile_id: int = 0
    tables: list[str] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)
    max_keys: int = 10_000


@dg.op(pool=CLICKHOUSE_POOL, description="Re-sync the recorded differing keys from PostgreSQL, then re-verify them.")
def repair_differences(
    context: dg.OpExecutionContext,
    config: RepairRunConfig,
    postgres: PostgresResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> None:
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        if config.reconcile_id:
            recorded = [load_differences(conn, reconcile_id=config.reconcile_id)]
        else:
            recorded = []
            for name, target in plan_pairs(config.tables or None, config.targets or None):
                try:
                    recorded.append(load_differences(conn, table=name, target=target))
                except ValueError:
                    context.log.info(f"{name} -> {target}: no reconciliation recorded yet")
        still = 0
        for rec in recorded:
            keys = rec.all_keys()
            if not keys:
                context.log.info(f"{rec.table} -> {rec.target}: nothing to repair (reconcile_id {rec.reconcile_id})")
                continue
            context.log.info(
                f"repairing {len(keys)} key(s) of {rec.table} in {rec.target} (reconcile_id {rec.reconcile_id})"
            )
            try:
                repaired = repair_pair(
                    rec.table,
                    rec.target,
                    recorded_keys(rec.table, keys),
                    conn=conn,
                    clickhouse=ch,
                    es=es,
                    max_keys=config.max_keys,
                )
            except RepairCapError as exc:
                raise dg.Failure(str(exc)) from None
            mark_repaired(conn, rec.reconcile_id, recorded_keys(rec.table, keys), repaired.still_different)
            still += len(repaired.still_different)
            context.log_event(
                dg.AssetObservation(
                    asset_key=pair_asset_key(rec.table, rec.target),
                    metadata={
                        "repaired_keys": dg.IntMetadataValue(repaired.requested),
                        "still_different_after_repair": dg.IntMetadataValue(len(repaired.still_different)),
                        "repair_seconds": dg.FloatMetadataValue(round(repaired.seconds, 3)),
                        "reconcile_id": dg.IntMetadataValue(rec.reconcile_id),
                    },
                )
            )
        if still:
            raise dg.Failure(f"{still} key(s) still differ after the repair (changed again meanwhile, or unwritable)")


@dg.job(description="Re-sync exactly the differing keys a reconciliation recorded, versioned, and re-verify them.")
def repair() -> None:
    repair_differences()


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        asset_checks=[reconcile_stores],
        jobs=[reconcile_job, repair],
        schedules=[reconcile_hourly, reconcile_daily],
    )
