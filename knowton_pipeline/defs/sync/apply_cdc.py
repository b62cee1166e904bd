"""`apply_cdc`: apply the cdc-* topics to ClickHouse and Elasticsearch until caught up; `cdc_lag_sensor`."""

import dagster as dg

from knowton_pipeline.catalog import CDC_TABLES, HEARTBEAT, TABLES
from knowton_pipeline.defs.clickhouse.mirrors import mirror_key
from knowton_pipeline.defs.elasticsearch.indices import index_key
from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaResource,
    PostgresResource,
)
from knowton_pipeline.defs.runs import next_run_request, run_in_flight
from knowton_pipeline.lib.sync.apply import DEFAULT_GROUP, ApplyConfig, ApplyStats, CdcApplier, group_lag

HEARTBEATS_WORTH_A_RUN = 12


class ApplyCdcConfig(dg.Config):
    max_seconds: float = 600.0
    batch_size: int = 2000
    max_retry_seconds: float = 300.0


@dg.op(pool=CLICKHOUSE_POOL, description="Consume cdc-* until caught up; write both stores; dead-letter poison.")
def apply_cdc_events(
    context: dg.OpExecutionContext,
    config: ApplyCdcConfig,
    postgres: PostgresResource,
    kafka: KafkaResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> dg.Output[dict]:
    def progress(stats: ApplyStats) -> None:
        context.log.info(stats.summary())

    with clickhouse_store.get_client() as ch, elasticsearch.get_client() as es:
        applier = CdcApplier(
            ApplyConfig(
                bootstrap=kafka.bootstrap_servers,
                batch_size=config.batch_size,
                max_retry_seconds=config.max_retry_seconds,
            ),
            clickhouse=ch,
            es=es,
            pg_conninfo=postgres.conninfo(),
            on_progress=progress,
        )
        stats = applier.run(until_caught_up=True, max_seconds=config.max_seconds)
    context.log.info(f"done: {stats.summary()}")
    for t in TABLES:
        keys = [mirror_key(t)] + ([index_key(t)] if t.elasticsearch_index else [])
        for key in keys:
            context.log_event(
                dg.AssetObservation(
                    asset_key=key,
                    metadata={"cdc_events_applied": stats.per_table.get(t.name, 0), "cdc_consumer_lag": stats.lag},
                )
            )
    return dg.Output(
        {"events": stats.events, "lag": stats.lag},
        metadata={
            "events": stats.events,
            "clickhouse_rows": stats.clickhouse_rows,
            "elasticsearch_docs": stats.elasticsearch_docs,
            "stale_writes_refused": stats.stale,
            "dead_lettered_clickhouse": stats.dead_lettered["clickhouse"],
            "dead_lettered_elasticsearch": stats.dead_lettered["elasticsearch"],
            "retries": stats.retries,
            "lag_after": stats.lag,
            "events_per_second": round(stats.events / stats.seconds, 1) if stats.seconds else 0.0,
        },
    )


@dg.job(
    description="Apply CDC events from Kafka to the ClickHouse mirrors and Elasticsearch indices until caught up.",
    tags={"knowton/kind": "cdc-apply"},
)
def apply_cdc() -> None:
    apply_cdc_events()


@dg.sensor(
    job=apply_cdc,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches apply_cdc when the sync consumer group has lag and no apply_cdc run is in flight.",
)
def cdc_lag_sensor(context: dg.SensorEvaluationContext, kafka: KafkaResource) -> dg.SensorResult:
    lag = group_lag(kafka.bootstrap_servers, DEFAULT_GROUP, [t.topic for t in CDC_TABLES])
    total = sum(lag.values())
    data_lag = total - lag.get(HEARTBEAT.topic, 0)
    # Heartbeats arrive every few seconds; alone they are worth a run about once a minute, not each tick.
    if data_lag == 0 and lag.get(HEARTBEAT.topic, 0) < HEARTBEATS_WORTH_A_RUN:
        return dg.SensorResult(skip_reason=f"no data lag ({lag.get(HEARTBEAT.topic, 0)} heartbeats pending)")
    in_flight = run_in_flight(context.instance, apply_cdc)
    if in_flight:
        return dg.SensorResult(skip_reason=f"lag {total}, apply_cdc run {in_flight} in flight")
    return next_run_request(
        context,
        "apply-cdc",
        {"knowton/cdc_lag": str(total)},
        dg.RunConfig(ops={apply_cdc_events.name: ApplyCdcConfig()}),
    )
