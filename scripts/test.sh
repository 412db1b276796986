#!/usr/bin/env bash
# Install what the tests need, lint, and run the whole test-suite against real components
# (Triton, MLflow, Great Expectations, Airflow dag.test()).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
