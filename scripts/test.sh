#!/usr/bin/env bash
# The test command: set up .venv/ if needed, lint (ruff, pyproject's rule set), then run the whole
# suite (CPU, 10-16 min on 2 cores: README, *Quick start*; `scripts/test.sh -m "not slow"` skips
# the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .
# Test files are spread over the cores (pytest-xdist; one file stays on one worker, so its
# module fixtures run once): most of a test's time is single-threaded XLA compilation.
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
