#!/usr/bin/env bash
# The main job: EDFM on Fashion-MNIST from the shipped teachers and KD backbone, then the test
# table (teacher ensemble, KD, EDFM with 32 members). Sets up .venv/ and the data when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/get_fashion_mnist.sh
exec .venv/bin/python edfm.py --config config/distillation/edfm_fmnist_frnrelu.yaml "$@"
