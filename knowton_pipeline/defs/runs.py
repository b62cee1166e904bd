"""Helpers sensors share to keep their run requests from piling up."""

import dagster as dg

from knowton_pipeline.defs.cursors import RunCounterCursor

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def run_in_flight(instance: dg.DagsterInstance, job: dg.JobDefinition) -> str | None:
    """The id of a queued or running run of `job`, if there is one."""
    records = instance.get_run_records(dg.RunsFilter(job_name=job.name, statuses=IN_FLIGHT), limit=1)
    return records[0].dagster_run.run_id if records else None


def next_run_request(
    context: dg.SensorEvaluationContext, prefix: str, tags: dict[str, str], run_config: dg.RunConfig
) -> dg.SensorResult:
    """One run request whose key the cursor makes unique: `<prefix>-<n>`."""
    cursor = RunCounterCursor.load(context)
    cursor.requested += 1
    request = dg.RunRequest(run_key=f"{prefix}-{cursor.requested}", run_config=run_config, tags=tags)
    return dg.SensorResult(run_requests=[request], cursor=cursor.dump())
