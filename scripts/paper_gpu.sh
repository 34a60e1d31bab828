#!/usr/bin/env bash
# Issue #17 item 5: the paper's Fashion-MNIST students (scripts/paper_students.sh's 15 runs: KD,
# ProxyEnDD, Hydra, FED and EDFM, seeds 2025-2027, ResNet-8x2 FRN-Swish) on one lent GPU with a
# longer schedule, evaluated and aggregated as on the CPU (scripts/paper_evaluate.sh), in one
# command sized for the device tool's 10-minute call.
#
#   here, once:   bash bench/accelerator_suite.sh --prepare            (wheels into .whl/)
#                 mkdir -p data_root/FashionMNIST && cp /usr/share/datasets/fashion-mnist/* data_root/FashionMNIST/
#   device run:   command "bash scripts/paper_gpu.sh", carry [".whl", "data_root"], timeout_s 600
#   here, then:   tar xzf <files_at>/paper_gpu.tgz    (docs/results/fmnist_paper_gpu/ and
#                 runs/paper_gpu/: the runs' logs, times.txt and the evaluations)
#
# EPOCHS (10) is the schedule of every student, WORKERS (5) the training processes sharing the
# GPU (each allocates as it goes: XLA_PYTHON_CLIENT_PREALLOCATE=false). The runs are resumable
# as on the CPU, but a device machine keeps nothing between calls: size EPOCHS to fit.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PY=${PYTHON:-python3}
source scripts/device_env.sh
device_env "$PY" || exit 2
if [[ ! -e data/FashionMNIST && -d data_root/FashionMNIST ]]; then
    ln -s ../data_root/FashionMNIST data/FashionMNIST  # where the configs' data_root ./data/ looks
fi
export EPOCHS=${EPOCHS:-10} RUNS=runs/paper_gpu WORKERS=${WORKERS:-5} PIN=0
export EVALS=runs/paper_gpu/evaluate RESULTS=docs/results/fmnist_paper_gpu PARALLEL=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
start=$SECONDS
scripts/paper_students.sh
echo "students: $((SECONDS - start)) s ($EPOCHS epochs each)" | tee -a "$RUNS/times.txt"
scripts/paper_evaluate.sh
status=$?
echo "students and evaluations: $((SECONDS - start)) s, exit $status" | tee -a "$RUNS/times.txt"
if [[ -n ${OUT:-} ]]; then  # the device tool fetches $OUT: one archive of the results and logs
    tar czf "$OUT/paper_gpu.tgz" "$RESULTS" "$RUNS"/*.log "$RUNS"/times.txt \
        "$EVALS"/*.log "$EVALS"/*/results.* 2>/dev/null
fi
exit "$status"
