"""Helpers sensors share to keep their run requests from piling up."""

import dagster as dg

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def run_in_flight(instance: dg.DagsterInstance, job_name: str) -> str | None:
    """The id of a queued or running run of `job_name`, if there is one."""
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1)
    return records[0].dagster_run.run_id if records else None


def next_run_request(context: dg.SensorEvaluationContext, prefix: str, tags: dict[str, str]) -> dg.SensorResult:
    """One run request whose key the cursor makes unique: `<prefix>-<n>`."""
    cursor = int(context.cursor or 0) + 1
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"{prefix}-{cursor}", tags=tags)], cursor=str(cursor))
