#!/usr/bin/env bash
# Issue #17: evaluate the paper students of scripts/paper_students.sh, one evaluation per seed
# (the test split: every student against one teacher ensemble), then aggregate.py over the seeds
# into docs/results/fmnist_paper (mean ± std, EDFM's paired differences, sweep bands).
#   scripts/paper_evaluate.sh            # runs/evaluate/paper_s<seed>, then the aggregate
# Each seed's tables and plots are copied to $OUT/paper_s<seed>/.
# An evaluation already written is kept (evaluate.py never overwrites): delete it to redo it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-docs/results/fmnist_paper}
mkdir -p runs/evaluate
evaluations=()
for seed in 2025 2026 2027; do
    dir=runs/evaluate/paper_s$seed
    if [[ ! -f $dir/results.json ]]; then
        $PY evaluate.py --config "config/evaluate/fmnist_paper_s$seed.yaml" --save "$dir" > "$dir.log" 2>&1
    fi
    evaluations+=("$dir")
done
$PY aggregate.py --evaluations "${evaluations[@]}" --against EDFM --save "$OUT"
for dir in "${evaluations[@]}"; do  # each seed's own tables and plots beside the aggregate
    mkdir -p "$OUT/${dir##*/}"
    cp "$dir"/results.md "$dir"/results.json "$dir"/*.png "$OUT/${dir##*/}/"
done
