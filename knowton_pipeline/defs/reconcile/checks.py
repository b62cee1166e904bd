"""Reconciliation as asset checks: every ClickHouse mirror, search index and aggregate against PostgreSQL.

One subsettable multi-asset check runs them; the `reconcile` job runs all of them (or the tables and
targets its run config names), `reconcile_hourly` incrementally and `reconcile_daily` in full. Drift
up to `error_above_keys` differing keys is a WARN, more is an ERROR; the keys go to ops.reconcile_diffs
and the `repair` job re-syncs exactly them.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from knowton_pipeline.catalog import table
from knowton_pipeline.defs.clickhouse.aggregates import aggregate_key
from knowton_pipeline.defs.partitions import DAILY
from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaResource,
    PostgresResource,
)
from knowton_pipeline.defs.store_assets import store_asset_key
from knowton_pipeline.lib.aggregates import AGGREGATES
from knowton_pipeline.lib.reconcile.engine import Mode
from knowton_pipeline.lib.reconcile.flow import (
    Connections,
    PairOutcome,
    ReconcileRequest,
    reconcile_pairs,
    repair_recorded,
)
from knowton_pipeline.lib.reconcile.record import key_text
from knowton_pipeline.lib.reconcile.run import is_aggregate, plan_pairs
from knowton_pipeline.lib.settings import setting
from knowton_pipeline.lib.stores.clickhouse import CLICKHOUSE
from knowton_pipeline.lib.stores.elasticsearch import ELASTICSEARCH
from knowton_pipeline.lib.sync.apply import SinkTurns

CHECK_NAME = "matches_postgres"
SAMPLE = 20


def pair_asset_key(name: str, target: str) -> dg.AssetKey:
    if is_aggregate(name):
        return aggregate_key(AGGREGATES[name])
    return store_asset_key(target, table(name))


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

    mode: Mode = Field(
        "checksum",
        description=(
            "incremental: rows changed in the window; checksum: every row; full: also hash every search document"
        ),
    )
    tables: list[str] = Field(default_factory=list, description="User, Content, ...; empty: all, with aggregates")
    targets: list[str] = Field(default_factory=list, description="clickhouse, elasticsearch; empty: both")
    error_above_keys: int = Field(100, description="more differing keys than this is an ERROR, fewer a WARN")
    window_minutes: float = Field(60.0, description="incremental: rows changed this long ago or later")
    settle_seconds: float = Field(5.0, description="wait before re-checking differences (0: report the first pass)")
    stuck_seconds: float = Field(
        60.0, description="a key whose source changes while its target stands still this long is reported as lagging"
    )
    threshold: int = Field(256, description="segments with at most this many rows are compared row by row")
    aggregate_days: int = Field(0, description="0: every materialized day; N: the last N materialized days")
    repair: bool = Field(False, description="re-sync the differing keys right after the check, then verify them")
    max_repair_keys: int = Field(1000, description="more differing keys than this are left for a backfill")
    repair_reason: str = Field("repair requested in the run config", description="recorded with every repaired key")
    sink_turn_seconds: float = Field(
        5.0,
        description=(
            "embedded engine: the ClickHouse sink applies CDC between the run's steps at most this often, so while a "
            "re-check waits for ClickHouse to apply past its position, the sink gets a turn within seconds"
        ),
    )

    def request(self) -> ReconcileRequest:
        return ReconcileRequest(
            mode=self.mode,
            threshold=self.threshold,
            window_minutes=self.window_minutes,
            settle_seconds=self.settle_seconds,
            stuck_seconds=self.stuck_seconds,
            repair=self.repair,
            max_repair_keys=self.max_repair_keys,
            repair_reason=self.repair_reason,
        )


def _with_sink_turns(context: dg.OpExecutionContext, turns: SinkTurns | None) -> Callable[[str], None]:
    """Progress that is logged and, while the run holds the embedded engine, gives the ClickHouse sink its turns:
    changes keep reaching the mirrors during a long run, and differences that were only in flight settle."""

    def progress(message: str) -> None:
        context.log.info(message)
        if turns is not None:
            before = turns.events
            turns()
            if turns.events > before:
                context.log.info(f"the ClickHouse sink took its turn: {turns.events - before} change(s) applied")

    return progress


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


def _repair_metadata(
    context: dg.AssetCheckExecutionContext, outcome: PairOutcome, request_reason: str
) -> dict[str, Any]:
    if outcome.repair_refused:
        context.log.warning(outcome.repair_refused)
        return {"repair": dg.MetadataValue.text(f"skipped: {outcome.repair_refused}")}
    repaired = outcome.repair
    if repaired is None:
        return {}
    context.log.info(
        f"repaired {repaired.requested} key(s) of {outcome.table} in {outcome.target}: {repaired.as_dict()}"
    )
    return {
        "repair_reason": dg.MetadataValue.text(request_reason),
        "repaired_keys": dg.IntMetadataValue(repaired.requested),
        "still_different_after_repair": dg.IntMetadataValue(len(repaired.still_different)),
    }


def _metadata(context: dg.AssetCheckExecutionContext, outcome: PairOutcome, repair_reason: str) -> dict[str, Any]:
    result, reconcile_id = outcome.result, outcome.reconcile_id
    assert result is not None and reconcile_id is not None
    d = result.differences
    sample = [*map(key_text, d.missing_in_target[:SAMPLE]), *map(key_text, d.extra_in_target[:SAMPLE])]
    sample += [f"{key_text(k)} ({', '.join(c)})" for k, c in list(d.different.items())[:SAMPLE]]
    days = {"days_compared": dg.IntMetadataValue(len(outcome.days))} if outcome.days is not None else {}
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
        **days,
        **_repair_metadata(context, outcome, repair_reason),
        **(
            {"time_to_heal_seconds": dg.FloatMetadataValue(round(outcome.healed_after_seconds, 1))}
            if outcome.healed_after_seconds is not None
            else {}
        ),
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
    kafka: KafkaResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> Iterator[dg.AssetCheckResult]:
    try:
        wanted = set(plan_pairs(config.tables or None, config.targets or None))
    except ValueError as exc:
        raise dg.Failure(str(exc)) from None
    pairs = _pairs_by_check_key()
    selected = [(k, pairs[k]) for k in sorted(context.selected_asset_check_keys, key=str) if pairs[k] in wanted]
    skipped = len(context.selected_asset_check_keys) - len(selected)
    if skipped:
        context.log.info(f"{skipped} check(s) left out by the run config's tables/targets")
    failed: list[str] = []
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        outcomes = reconcile_pairs(
            Connections(conn, {CLICKHOUSE.name: ch, ELASTICSEARCH.name: es}, kafka.bootstrap_servers),
            [pair for _, pair in selected],
            config.request(),
            aggregate_days=lambda name: _aggregate_days(context, name, config),
            dagster_run_id=context.run.run_id,
            on_progress=_with_sink_turns(
                context, clickhouse_store.sink_turns(ch, kafka, postgres, every=config.sink_turn_seconds)
            ),
        )
        for (check_key, _), outcome in zip(selected, outcomes, strict=True):
            if outcome.result is None:
                context.log.error(outcome.error or "no verdict")
                failed.append(f"{outcome.table} -> {outcome.target}: {outcome.error}")
                continue
            drift = outcome.result.differences.total
            # Drift a repair could not take on (more keys than the cap) is for a person: an ERROR, and alerted.
            too_much = drift > config.error_above_keys or outcome.repair_refused is not None
            severity = dg.AssetCheckSeverity.ERROR if too_much else dg.AssetCheckSeverity.WARN
            if drift == 0:
                description = f"{outcome.table} matches PostgreSQL ({outcome.result.source_rows} rows)"
            elif not outcome.remaining_drift:
                description = (
                    f"{drift} differing key(s) found and repaired, verified equal; see ops.reconcile_diffs "
                    f"(reconcile_id {outcome.reconcile_id})"
                )
            else:
                description = (
                    f"{drift} differing key(s) between PostgreSQL and {outcome.target}; see ops.reconcile_diffs "
                    f"(reconcile_id {outcome.reconcile_id})"
                )
            yield dg.AssetCheckResult(
                asset_key=check_key.asset_key,
                check_name=CHECK_NAME,
                # The verdict is on the stores as the run leaves them: drift repaired and verified passes, and
                # stays on record (differing_keys, repaired_keys, ops.reconcile_diffs).
                passed=not outcome.remaining_drift,
                severity=severity,
                description=description,
                metadata=_metadata(context, outcome, config.repair_reason),
            )
    if failed:
        # No verdict for these: a store failed mid-run, and a partial result is not presented as one.
        raise dg.Failure(description=f"{len(failed)} reconciliation(s) could not finish:\n" + "\n".join(failed))


reconcile_job = dg.define_asset_job(
    "reconcile",
    selection=dg.AssetSelection.checks(reconcile_stores),
    description="Reconcile every mirror, index and aggregate with PostgreSQL (run config narrows tables/targets).",
)


# Scheduled reconciliations repair what they find, up to this many keys per table and target; above it they
# only alert (an ERROR check), since that much drift is a backfill's job and a person's decision.
AUTO_REPAIR_KEYS = 1000


def _schedule(name: str, cron: str, mode: Mode, description: str) -> dg.ScheduleDefinition:
    config = ReconcileRunConfig(
        mode=mode,
        repair=True,
        max_repair_keys=AUTO_REPAIR_KEYS,
        error_above_keys=AUTO_REPAIR_KEYS,
        repair_reason=f"{name}: automatic repair of at most {AUTO_REPAIR_KEYS} keys",
    )
    return dg.ScheduleDefinition(
        name=name,
        job=reconcile_job,
        cron_schedule=cron,
        execution_timezone="UTC",
        run_config=dg.RunConfig(ops={reconcile_stores.node_def.name: config}),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )


# The crons come from the settings when the definitions load (defaults: hourly at :05, daily at 03:30 UTC), so a
# fault drill can run the same schedules on a cycle of minutes.
reconcile_hourly = _schedule(
    "reconcile_hourly",
    setting("KNOWTON_RECONCILE_INCREMENTAL_CRON"),
    "incremental",
    "Rows changed in the last hour (plus a margin), every hour.",
)
reconcile_daily = _schedule(
    "reconcile_daily",
    setting("KNOWTON_RECONCILE_FULL_CRON"),
    "full",
    "Every row and every search document, daily.",
)


class RepairRunConfig(dg.Config):
    """Which recorded reconciliation to repair: an id, or the latest of each selected table and target."""

    reconcile_id: int = Field(0, description="0: the latest reconciliation of each selected table and target")
    tables: list[str] = Field(default_factory=list, description="User, Content, ...; empty: all, with aggregates")
    targets: list[str] = Field(default_factory=list, description="clickhouse, elasticsearch; empty: both")
    max_keys: int = Field(10_000, description="more recorded keys than this are refused: a backfill's job")


@dg.op(pool=CLICKHOUSE_POOL, description="Re-sync the recorded differing keys from PostgreSQL, then re-verify them.")
def repair_differences(
    context: dg.OpExecutionContext,
    config: RepairRunConfig,
    postgres: PostgresResource,
    kafka: KafkaResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> None:
    try:
        pairs = [] if config.reconcile_id else plan_pairs(config.tables or None, config.targets or None)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from None
    still = 0
    with (
        postgres.get_connection(autocommit=True) as conn,
        clickhouse_store.get_client() as ch,
        elasticsearch.get_client() as es,
    ):
        for outcome in repair_recorded(
            Connections(conn, {CLICKHOUSE.name: ch, ELASTICSEARCH.name: es}, kafka.bootstrap_servers),
            reconcile_id=config.reconcile_id or None,
            pairs=pairs,
            max_keys=config.max_keys,
            on_progress=_with_sink_turns(context, clickhouse_store.sink_turns(ch, kafka, postgres, every=5.0)),
        ):
            if outcome.repair_refused:
                raise dg.Failure(outcome.repair_refused)
            repaired, rec = outcome.repair, outcome.recorded
            if repaired is None:
                continue
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
