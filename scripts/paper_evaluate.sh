#!/usr/bin/env bash
# Issue #17: evaluate the paper students of scripts/paper_students.sh, one evaluation per seed
# (the test split: every student against one teacher ensemble), then aggregate.py over the seeds
# into docs/results/fmnist_paper (mean ± std, EDFM's paired differences, sweep bands).
#   scripts/paper_evaluate.sh            # runs/evaluate/paper_s<seed>, then the aggregate
# Each seed's tables and plots are copied to $RESULTS/paper_s<seed>/.
# An evaluation already written is kept (evaluate.py never overwrites): delete it to redo it.
#
# The environment sets: RUNS (the students' folder, runs/paper: the configs
# config/evaluate/fmnist_paper_s<seed>.yaml name runs/paper/, read with RUNS in its place),
# EVALS (the evaluations' folder, runs/evaluate), RESULTS (docs/results/fmnist_paper),
# PARALLEL (0: the seeds one after another; 1: side by side, on an accelerator) and PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/paper}
EVALS=${EVALS:-runs/evaluate}
RESULTS=${RESULTS:-docs/results/fmnist_paper}
PARALLEL=${PARALLEL:-0}
mkdir -p "$EVALS"

evaluate_seed() {  # seed: its evaluation into $EVALS/paper_s<seed>, unless already written
    local dir=$EVALS/paper_s$1 config=config/evaluate/fmnist_paper_s$1.yaml
    if [[ $RUNS != runs/paper ]]; then  # the same students, trained into another folder
        sed "s#runs/paper/#${RUNS%/}/#g" "$config" > "$EVALS/fmnist_paper_s$1.yaml"
        config=$EVALS/fmnist_paper_s$1.yaml
    fi
    if [[ ! -f $dir/results.json ]]; then
        $PY evaluate.py --config "$config" --save "$dir" > "$dir.log" 2>&1
    fi
}

evaluations=()
for seed in 2025 2026 2027; do
    if ((PARALLEL)); then evaluate_seed "$seed" & else evaluate_seed "$seed"; fi
    evaluations+=("$EVALS/paper_s$seed")
done
wait
for dir in "${evaluations[@]}"; do
    [[ -f $dir/results.json ]] || { echo "$dir has no results.json: see $dir.log" >&2; exit 1; }
done
$PY aggregate.py --evaluations "${evaluations[@]}" --against EDFM --save "$RESULTS"
for dir in "${evaluations[@]}"; do  # each seed's own tables and plots beside the aggregate
    mkdir -p "$RESULTS/${dir##*/}"
    cp "$dir"/results.md "$dir"/results.json "$dir"/*.png "$RESULTS/${dir##*/}/"
done
