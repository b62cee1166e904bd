"""`reprocess_dlq` re-applies dead letters; `dlq_sensor` watches the DLQ depth and launches it."""

import dagster as dg

from knowton_pipeline.defs.resources import (
    CLICKHOUSE_POOL,
    ClickHouseResource,
    ElasticsearchResource,
    KafkaResource,
    PostgresResource,
)
from knowton_pipeline.defs.runs import next_run_request, run_in_flight
from knowton_pipeline.lib.sync import dlq
from knowton_pipeline.lib.sync.replay import DlqReplayer, ReplayConfig, ReplayStats, dlq_depths

DLQ_TOPICS = (*dlq.TARGET_DLQ.values(), dlq.PARKED_TOPIC)


def dlq_topic_key(topic: str) -> dg.AssetKey:
    return dg.AssetKey(["kafka", "topics", topic])


dlq_topic_specs = [
    dg.AssetSpec(
        key=dlq_topic_key(topic),
        group_name="dlq",
        kinds={"kafka"},
        description=(
            "Records parked after their last replay attempt (also listed in ops.dlq_parked)."
            if topic == dlq.PARKED_TOPIC
            else f"Records that could never be applied to {target}, waiting for reprocess_dlq."
        ),
        metadata={"topic": topic},
    )
    for target, topic in [*dlq.TARGET_DLQ.items(), ("", dlq.PARKED_TOPIC)]
]


def unresolved_parked(postgres: PostgresResource) -> int:
    with postgres.get_connection() as conn:
        row = conn.execute("SELECT count(*) FROM ops.dlq_parked WHERE resolved_at IS NULL").fetchone()
    return int(row[0]) if row else 0


def depth_observations(depths: dict[str, int], parked: int) -> list[dg.AssetObservation]:
    events = [
        dg.AssetObservation(asset_key=dlq_topic_key(topic), metadata={"dlq_depth": depths.get(topic, 0)})
        for topic in dlq.TARGET_DLQ.values()
    ]
    events.append(
        dg.AssetObservation(
            asset_key=dlq_topic_key(dlq.PARKED_TOPIC),
            metadata={"parked_records": depths.get(dlq.PARKED_TOPIC, 0), "parked_unresolved": parked},
        )
    )
    return events


class ReprocessDlqConfig(dg.Config):
    max_attempts: int = 5
    backoff_base_seconds: float = 30.0
    ignore_backoff: bool = False
    max_seconds: float = 600.0


@dg.op(pool=CLICKHOUSE_POOL, description="Re-apply due dead letters; requeue failures; park after the last attempt.")
def replay_dead_letters(
    context: dg.OpExecutionContext,
    config: ReprocessDlqConfig,
    postgres: PostgresResource,
    kafka: KafkaResource,
    clickhouse_store: ClickHouseResource,
    elasticsearch: ElasticsearchResource,
) -> dg.Output[dict]:
    def progress(stats: ReplayStats) -> None:
        context.log.info(stats.summary())

    with clickhouse_store.get_client() as ch, elasticsearch.get_client() as es:
        replayer = DlqReplayer(
            ReplayConfig(
                bootstrap=kafka.bootstrap_servers,
                max_attempts=config.max_attempts,
                backoff_base_seconds=config.backoff_base_seconds,
                ignore_backoff=config.ignore_backoff,
            ),
            clickhouse=ch,
            es=es,
            pg_conninfo=postgres.conninfo(),
            on_progress=progress,
        )
        stats = replayer.run(max_seconds=config.max_seconds)
    context.log.info(f"done: {stats.summary()}")
    for event in depth_observations(dlq_depths(kafka.bootstrap_servers), unresolved_parked(postgres)):
        context.log_event(event)
    return dg.Output(
        {"applied": stats.applied, "parked": stats.parked},
        metadata={
            "read": stats.read,
            "applied": stats.applied,
            "failed_again": stats.requeued,
            "waiting_for_backoff": stats.not_due,
            "parked": stats.parked,
        },
    )


@dg.job(description="Re-apply DLQ records through the same transform; park them after the last attempt.")
def reprocess_dlq() -> None:
    replay_dead_letters()


@dg.sensor(
    job=reprocess_dlq,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records DLQ depth and parked count; launches reprocess_dlq when a DLQ has records.",
)
def dlq_sensor(
    context: dg.SensorEvaluationContext, kafka: KafkaResource, postgres: PostgresResource
) -> dg.SensorResult:
    depths = dlq_depths(kafka.bootstrap_servers)
    events = depth_observations(depths, unresolved_parked(postgres))
    waiting = sum(depths.get(t, 0) for t in dlq.TARGET_DLQ.values())
    if waiting == 0:
        return dg.SensorResult(asset_events=events, skip_reason="DLQs are empty")
    in_flight = run_in_flight(context.instance, reprocess_dlq)
    if in_flight:
        return dg.SensorResult(asset_events=events, skip_reason=f"{waiting} waiting; replay run {in_flight} in flight")
    request = next_run_request(
        context,
        "reprocess-dlq",
        {"knowton/dlq_depth": str(waiting)},
        dg.RunConfig(ops={replay_dead_letters.name: ReprocessDlqConfig()}),
    )
    return dg.SensorResult(asset_events=events, run_requests=request.run_requests, cursor=request.cursor)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=dlq_topic_specs, jobs=[reprocess_dlq], sensors=[dlq_sensor])
