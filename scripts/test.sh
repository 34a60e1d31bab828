#!/usr/bin/env bash
# The test command: set up .venv/ if needed, lint (ruff, pyproject's rule set), then run the whole
# suite (CPU, ~10 min on 2 cores; `scripts/test.sh -m "not slow"` skips the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
