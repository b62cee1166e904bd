#!/usr/bin/env bash
# Install what the project needs on a fresh machine: Debian packages (Java, Maven, PostgreSQL, Chromium) when
# missing, the Python virtualenv with the project, and the stack's jars from Maven Central.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v java >/dev/null 2>&1 || [ -x "${JAVA_HOME:-/nonexistent}/bin/java" ] || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
# The compiled reading of change events (knowton_pipeline/lib/_columns.c) is built by the install.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || need_apt+=(python3-dev)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)  # the UI tests drive Debian's Chromium
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${need_apt[*]}; install them (Debian: sudo apt-get install ${need_apt[*]}) and run again" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Reinstall the Python packages only when pyproject.toml or the compiled reading's source changed.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.knowton-installed
want=$(cat pyproject.toml knowton_pipeline/lib/_columns.c | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi

# The stack's jars (Kafka, Connect, Debezium, Elasticsearch) are resolved by `knowton stack up` when missing.
