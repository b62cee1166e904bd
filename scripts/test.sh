#!/usr/bin/env bash
# One command for the tests: set up, start the tests' own stack, lint, run pytest, and stop that stack
# again if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
# The tests' stack: home .knowton/test, ports 15432, 19092, ... (each default plus 10000), the jars shared
# with the demo's home. The demo's stack and data are never touched, and both stacks can run at once.
test_env=$(.venv/bin/python -m knowton_pipeline_tests.stack_home)
eval "$test_env"
knowton=.venv/bin/knowton
# The servers only: the tests drive the sinks themselves (the demo's `stack up` also starts the search sink).
servers=$(.venv/bin/python -c 'from knowton_pipeline.stack.components import SERVERS; print(" ".join(SERVERS))')
started_here=0
if ! $knowton stack status $servers >/dev/null 2>&1; then
  started_here=1
fi
stop_stack() {
  if [ "$started_here" = 1 ]; then
    $knowton stack down || true
  fi
}
trap stop_stack EXIT
$knowton stack up $servers
eval "$($knowton env)"
.venv/bin/ruff check knowton_pipeline knowton_pipeline_tests
mkdir -p test-output
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
echo "tests finished in $(( $(date +%s) - t0 )) s"
