#!/usr/bin/env bash
# The demo on a fresh machine: install, start Triton + MLflow + Airflow on loopback, run the
# pipeline on the Home Depot data, answer a query, deploy a faulty version and watch the
# monitor DAG roll it back. The stack keeps running afterwards: `.venv/bin/recsys stack down`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/recsys demo "$@"
