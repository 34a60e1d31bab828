#!/usr/bin/env bash
# The test command: set up .venv/ if needed, then run the whole suite (CPU, ~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
