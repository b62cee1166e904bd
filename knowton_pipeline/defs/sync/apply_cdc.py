"""`apply_cdc`: the ClickHouse sink as micro-batches, for the embedded engine; `cdc_lag_sensor` launches it.

The embedded engine can be open in one process at a time, so its sink cannot run beside Dagster's runs: it runs as
a run in the `clickhouse` pool, launched within seconds of a change by the sensor, until caught up. The search sink
runs continuously outside Dagster (`knowton sink run --store elasticsearch`), and so does the ClickHouse sink when
the DSN names a server; then this sensor stands down."""

import dagster as dg
from pydantic import Field, field_validator

from knowton_pipeline.catalog import CDC_TABLES, HEARTBEAT, TABLES
from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaResource,
    PostgresResource,
)
from knowton_pipeline.defs.runs import next_run_request, run_in_flight
from knowton_pipeline.defs.store_assets import store_asset_key
from knowton_pipeline.lib.stores import TARGETS
from knowton_pipeline.lib.sync.apply import ApplyConfig, ApplyStats, SideBySide, group_lag, sink_group

HEARTBEATS_WORTH_A_RUN = 60  # about five minutes of them: they keep the group's position current, nothing more
SINK_STORE = "clickhouse"


class ApplyCdcConfig(dg.Config):
    max_seconds: float = 600.0
    batch_size: int | None = Field(
        default=None,
        description="Changes per batch; by default each store's own (ClickHouse 20000, Elasticsearch 2000).",
    )
    max_retry_seconds: float = 300.0
    stores: list[str] = Field(
        default=[SINK_STORE],
        description="The stores whose sinks run, each in its own consumer group; add elasticsearch to catch "
        "search up from Dagster while its service is down.",
    )

    @field_validator("stores")
    @classmethod
    def _known(cls, stores: list[str]) -> list[str]:
        unknown = [s for s in stores if s not in TARGETS]
        if unknown or not stores:
            raise ValueError(f"unknown store(s) {unknown}; stores are: {', '.join(TARGETS)}")
        return stores


@dg.op(pool=CLICKHOUSE_POOL, description="Run the stores' sinks until caught up; dead-letter poison.")
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

    stores = list(dict.fromkeys(config.stores))
    with clickhouse_store.get_client() as ch, elasticsearch.get_client() as es:
        clients = {name: client for name, client in (("clickhouse", ch), ("elasticsearch", es)) if name in stores}
        stats = SideBySide.of(
            ApplyConfig(
                bootstrap=kafka.bootstrap_servers,
                batch_size=config.batch_size,
                max_retry_seconds=config.max_retry_seconds,
            ),
            clients,
            postgres.conninfo(),
            on_progress=progress,
        ).run(until_caught_up=True, max_seconds=config.max_seconds)
    context.log.info(f"done: {stats.summary()}")
    for store in stores:
        for t in TABLES:
            if TARGETS[store].holds(t):
                context.log_event(
                    dg.AssetObservation(
                        asset_key=store_asset_key(store, t),
                        metadata={"cdc_events_applied": stats.per_table.get(t.name, 0), "cdc_consumer_lag": stats.lag},
                    )
                )
    return dg.Output(
        {"events": stats.events, "lag": stats.lag},
        metadata={
            "events": stats.events,
            **{f"written_{store}": stats.written[store] for store in stores},
            **{f"dead_lettered_{store}": stats.dead_lettered[store] for store in stores},
            "stale_writes_refused": stats.stale,
            "retries": stats.retries,
            "lag_after": stats.lag,
            "events_per_second": round(stats.events / stats.seconds, 1) if stats.seconds else 0.0,
        },
    )


@dg.job(
    description="Run the ClickHouse sink (with the embedded engine) until caught up: CDC events from Kafka to the "
    "ClickHouse mirrors.",
    tags={"knowton/kind": "cdc-apply"},
)
def apply_cdc() -> None:
    apply_cdc_events()


@dg.sensor(
    job=apply_cdc,
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches apply_cdc when the ClickHouse sink's group has lag and no apply_cdc run is in flight "
    "(with the embedded engine; a ClickHouse server has the sink as a service).",
)
def cdc_lag_sensor(
    context: dg.SensorEvaluationContext, kafka: KafkaResource, clickhouse_store: ClickHouseResource
) -> dg.SensorResult:
    if not clickhouse_store.is_embedded:
        return dg.SensorResult(
            skip_reason="ClickHouse is a server: its sink runs as a service (knowton sink run --store clickhouse)"
        )
    lag = group_lag(kafka.bootstrap_servers, sink_group(SINK_STORE), [t.topic for t in CDC_TABLES])
    total = sum(lag.values())
    data_lag = total - lag.get(HEARTBEAT.topic, 0)
    # Heartbeats arrive every 5 s and change no store (the lag check reads the published ones): alone they are worth
    # a run every few minutes, not each tick.
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
