"""`deploy_connectors`: create or update the connectors in `connectors/` and report what changed."""

import dagster as dg

from knowton_pipeline.defs.resources import KafkaConnectResource
from knowton_pipeline.lib import connectors


class DeployConnectorsConfig(dg.Config):
    dry_run: bool = False


@dg.op(description="PUT each connector's config when it differs from connectors/*.json; report the changed keys.")
def deploy_connector_configs(
    context: dg.OpExecutionContext, config: DeployConnectorsConfig, kafka_connect: KafkaConnectResource
) -> dg.Output[list[dict[str, object]]]:
    results = connectors.deploy_connectors(
        kafka_connect.get_client(), connectors.load_connector_configs(), dry_run=config.dry_run
    )
    for r in results:
        context.log.info(r.describe())
    changed = [r for r in results if r.action != "unchanged"]
    return dg.Output(
        [r.as_dict() for r in results],
        metadata={
            "connectors": len(results),
            "changed": len(changed),
            "actions": dg.MetadataValue.json({r.name: r.as_dict() for r in results}),
        },
    )


@dg.job(description="Create or update the Kafka Connect connectors from connectors/ (idempotent).")
def deploy_connectors() -> None:
    deploy_connector_configs()
