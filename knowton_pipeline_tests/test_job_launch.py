"""`dagster job launch` submits every job from the command line to the demo instance (dagster.yaml, with
PostgreSQL storage), as the README shows operators. The runs are queued (no daemon here) and deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg

from knowton_pipeline.definitions import defs
from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings
from knowton_pipeline.stack.manager import Stack


def test_every_job_launches_from_the_command_line_against_the_demo_instance(stack: Stack, settings: Settings) -> None:
    jobs = sorted(j.name for j in defs().resolve_all_job_defs() if not j.name.startswith("__"))
    marker = f"launch-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **settings.export_env(include_secrets=True), "DAGSTER_HOME": str(settings.dagster_home)}
    dagster = str(Path(sys.executable).parent / "dagster")

    def launch(job: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        command = [dagster, "job", "launch", "-w", "workspace.yaml", "-j", job]
        command += ["--tags", json.dumps({"knowton/test": marker})]
        return job, subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)

    # Two launches at a time: each is a process that mostly loads the code location.
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = {job: done.stderr[-800:] for job, done in pool.map(launch, jobs) if done.returncode != 0}
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"knowton/test": marker}))
        launched = sorted(r.job_name for r in runs)
        for run in runs:  # never left for a daemon to pick up later
            instance.delete_run(run.run_id)
    assert failures == {}
    assert launched == jobs
