#!/usr/bin/env bash
# One command for the demo: set up, start the stack, apply schemas, deploy the CDC connector,
# seed demo data, and serve the Dagster UI on http://127.0.0.1:${KNOWTON_DAGSTER_PORT:-3000}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
knowton=.venv/bin/knowton
$knowton stack up
$knowton schema apply
$knowton connectors deploy
# Seeds once; on later starts the data is kept (`knowton seed --replace` reseeds).
$knowton seed --if-empty
eval "$($knowton env)"
# The project's virtualenv, active: `dg` checks that it runs the project's own environment.
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
# Runs that open the embedded ClickHouse share the pool "clickhouse"; setting its limit before the
# daemon starts closes the window in which the first two queued runs could both be launched.
dagster instance concurrency set clickhouse 1 >/dev/null
# ClickHouse brought up to date before Dagster starts (the search sink, a stack component, already applies), and a
# first run of the health checks and of the reconciliation queued: every check shows its verdict from the start,
# not at its schedule's next tick.
$knowton sink run --store clickhouse --once
for job in health_checks reconcile; do
  dagster job launch -w workspace.yaml -j "$job" >/dev/null 2>&1 || echo "could not queue $job; run it from the UI"
done
echo "Dagster UI: http://127.0.0.1:${KNOWTON_DAGSTER_PORT}  (Ctrl-C stops the UI; 'knowton stack down' stops the stack)"
# `dg dev` loads the project's code location (pyproject.toml, [tool.dg]) on the instance in DAGSTER_HOME.
exec dg dev -h 127.0.0.1 -p "${KNOWTON_DAGSTER_PORT}"
