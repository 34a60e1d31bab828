#!/usr/bin/env bash
# Every benchmark of bench/ in one command: on one GPU in under 8 minutes, or at the tiniest
# sizes on the CPU with --smoke (what tests/test_bench.py runs in CI).
#
#   bash bench/accelerator_suite.sh                 # from the repository root, on the accelerator
#   bash bench/accelerator_suite.sh --smoke --out_dir /tmp/r    # on the CPU, in about 2 minutes
#   bash bench/accelerator_suite.sh --prepare       # here, once: the wheels the GPU machine lacks
#   bash bench/accelerator_suite.sh --list          # the steps, commands and time limits
#
# The work is bench/suite.py's (its docstring says how the steps, time limits, warm-up and
# compilation cache work); this wrapper is what a bare machine needs around it: a Python that
# has the project's dependencies (the project itself is never installed: the scripts run from
# the checkout), the wheels it lacks, and the results packed where the device tool fetches them.
# Its flags go to bench/suite.py unchanged, except --prepare.
#
# A lent GPU session (the device tool's machine has python3 with jax[cuda], flax, optax,
# orbax-checkpoint, numpy, scipy and the rest of scripts/device_env.sh's DEVICE_IMAGE_HAS, but not
# dm-pix, grain or ott-jax, and no registry):
#   1. here:        bash bench/accelerator_suite.sh --prepare     (DEVICE_WHEELS into .whl/,
#                   which git ignores; uses this machine's pip and PyPI)
#   2. device run:  command "bash bench/accelerator_suite.sh", carry [".whl"], timeout_s 600
#                   (the suite keeps to --budget_s, 470 s by default, so a rerun of the failed
#                   steps still fits: "bash bench/accelerator_suite.sh --only KEY ...")
#   3. it writes, in bench/results/: <benchmark>-<device>.json per step (device: the GPU's kind,
#      e.g. throughput-c10-h200.json), suite-<device>.json (each step's status and seconds) and
#      tables-<device>.md (the README's tables filled from those files, the device named); with
#      $OUT set (the device tool), all of them and the log as $OUT/bench-results.tgz and
#      $OUT/suite.log.
#   4. here:        tar xzf <files_at>/bench-results.tgz    (from the repository root), then
#                   paste bench/results/tables-<device>.md into README.md's "Performance"
#                   (python3 bench/suite.py --tables <device> rewrites it from the JSON files)
#                   and commit the JSON files with it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY=${PYTHON:-python3}
source scripts/device_env.sh  # the image's packages, the wheels it lacks (DEVICE_WHEELS)

if [[ ${1:-} == --prepare ]]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .whl "${DEVICE_WHEELS[@]}"
fi

device_env "$PY" || exit 2

export PYTHONUNBUFFERED=1
if [[ -z ${OUT:-} ]]; then
    "$PY" bench/suite.py --python "$PY" "$@"
    exit $?
fi
stamp=$(mktemp)
"$PY" bench/suite.py --python "$PY" "$@" 2>&1 | tee "$OUT/suite.log"
status=${PIPESTATUS[0]}
# What this run wrote in bench/results (the device tool fetches at most 8 files: one archive).
find bench/results -type f -newer "$stamp" -print0 |
    tar czf "$OUT/bench-results.tgz" --null -T - && echo "packed $OUT/bench-results.tgz"
rm -f "$stamp"
exit "$status"
