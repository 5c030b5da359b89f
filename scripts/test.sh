#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, check lint, formatting and types (ruff, mypy;
# configured in pyproject.toml, silent when clean), then run the whole suite.
# Usage: bash scripts/test.sh [pytest arguments]   (e.g. -n 0 tests/worker: one process, one folder)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test

.venv/bin/ruff check --quiet
.venv/bin/ruff format --check --quiet
.venv/bin/mypy --no-error-summary

# The integration tests use a real Redis at 127.0.0.1:6379; start one if none answers.
if ! .venv/bin/python -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=2).ping()" 2>/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do
    .venv/bin/python -c "import redis; redis.Redis(host='127.0.0.1', port=6379).ping()" 2>/dev/null && break
    sleep 0.2
  done
fi

# Two test processes (pytest-xdist), each taking whole files: most tests wait for servers, studies and
# quiet periods, so two at once finish the suite in about half the time. Pass "-n 0" to run in one.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
