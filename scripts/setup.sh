#!/usr/bin/env bash
# Create the environment in .venv/ at the repository root when it is missing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
marker=.venv/.edfm-installed
if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$marker"
fi
