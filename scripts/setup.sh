#!/usr/bin/env bash
# Set up Lung Vision on a fresh machine (python3 and apt only): a virtual environment in .venv with
# the pinned dependencies and the project installed editable. With --test, also the test tools:
# dcmtk (storescu/echoscu), Orthanc, redis-server and chromium (the worklist browser test, driven by
# Playwright with Debian's chromium: no browser download) via apt, when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v storescu >/dev/null || missing+=(dcmtk)
  command -v Orthanc >/dev/null || missing+=(orthanc)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "missing ${missing[*]}: install them with apt-get (needs root)" >&2
      exit 1
    fi
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
