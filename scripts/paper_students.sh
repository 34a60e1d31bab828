#!/usr/bin/env bash
# Issue #17: the paper's Fashion-MNIST students, three seeds each, on the 2-core CPU.
#
#   EPOCHS=1 nohup nice -n 19 scripts/paper_students.sh > runs/paper/log.txt 2>&1 &
#
# Every student is the teacher member's architecture, ResNet-8x2 FRN-Swish (the configs'
# ResNet-8x1 students are one member's half width), trained for the same EPOCHS (the CPU
# budget) from the shipped MultiSWAG teachers (checkpoints_teacher/fmnist) with each config's
# recipe otherwise: KD, ProxyEnDD, Hydra and FED, and EDFM's head on each seed's KD student as
# its backbone. Runs go to $RUNS/<method>_s<seed> (runs/paper/ by default), logs to $RUNS/<name>.log,
# finishing times to $RUNS/times.txt.
#
# Two workers, each pinned to its own core (taskset; XLA's CPU runtime spreads ops over every
# core it may use, and two unpinned runs on two cores ran 2.5x slower than one per core), take
# the runs from one queue in the order below; a run waits for the one it builds on (EDFM for
# its KD backbone). Resumable: a finished run is skipped, an
# interrupted one continues from its last checkpoint (one every 100 steps), so the script can be
# started again, with the same EPOCHS, in a later session.
#
# The environment sets: EPOCHS (1), RUNS (the folder, runs/paper), WORKERS (2), PIN (1: worker i
# on core i, XLA's CPU runtime single-threaded; 0 on an accelerator), PY (.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-1}
RUNS=${RUNS:-runs/paper}
WORKERS=${WORKERS:-2}
PIN=${PIN:-1}
PY=${PY:-.venv/bin/python}
if ((PIN)); then
    export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
fi
mkdir -p "$RUNS"
rm -rf "$RUNS"/*.claim "$RUNS"/*.failed  # an earlier start's claims and failures

# name | script | config | the run it builds on | extra flags
QUEUE="
fed_s2025   fed.py         fed   -
kd_s2025    kd_and_endd.py kd    -
kd_s2026    kd_and_endd.py kd    -
kd_s2027    kd_and_endd.py kd    -
fed_s2026   fed.py         fed   -
edfm_s2025  edfm.py        edfm  kd_s2025
edfm_s2026  edfm.py        edfm  kd_s2026
edfm_s2027  edfm.py        edfm  kd_s2027
fed_s2027   fed.py         fed   -
endd_s2025  kd_and_endd.py endd  -
endd_s2026  kd_and_endd.py endd  -
endd_s2027  kd_and_endd.py endd  -
hydra_s2025 hydra.py       hydra -
hydra_s2026 hydra.py       hydra -
hydra_s2027 hydra.py       hydra -
"

finished() { [[ -f $RUNS/$1/finished ]]; }
failed() { [[ -f $RUNS/$1.failed ]]; }  # this start gave up on it (see its log)

run() {  # name script config_stem after
    local name=$1 script=$2 stem=$3 after=$4
    local dir=$RUNS/$name seed=${name##*_s} start=$SECONDS
    local extra=()
    if [[ $stem == edfm ]]; then
        extra=(--pretrained_resnet "$RUNS/$after" --test_table false)
    fi
    if [[ -f $dir/config.yaml ]]; then
        $PY "$script" --resume "$dir" >> "$dir.log" 2>&1
    else
        $PY "$script" --config "config/distillation/${stem}_fmnist_frnrelu.yaml" --model_width 2 \
            --optim_ne "$EPOCHS" --seed "$seed" --checkpoint_every 100 --save "$dir" "${extra[@]}" \
            > "$dir.log" 2>&1
    fi
    local status=$?
    if ((status == 0)); then touch "$dir/finished"; else touch "$dir.failed"; fi
    echo "$(date -u +%FT%TZ) $name exit $status, $((SECONDS - start)) s" >> "$RUNS/times.txt"
}

worker() {  # take the first unclaimed run whose predecessor is finished, until none is left
    while true; do
        local waiting=0 took=0
        while read -r name script stem after; do
            [[ -z $name ]] && continue
            finished "$name" || failed "$name" && continue
            [[ $after != - ]] && failed "$after" && continue
            [[ -d $RUNS/$name.claim ]] && { waiting=1; continue; }
            if [[ $after != - ]] && ! finished "$after"; then waiting=1; continue; fi
            mkdir "$RUNS/$name.claim" 2>/dev/null || continue  # another worker took it
            run "$name" "$script" "$stem" "$after"
            took=1
            break
        done <<< "$QUEUE"
        ((took)) && continue
        ((waiting)) || return 0
        sleep 30
    done
}

pinned_worker() {  # a worker whose runs use core $1 only (with PIN, where taskset and that core exist)
    if ((PIN)); then taskset -cp "$1" $BASHPID > /dev/null 2>&1 || true; fi
    worker
}

for ((i = 0; i < WORKERS; i++)); do pinned_worker "$i" & done
wait
echo "$(date -u +%FT%TZ) all done" >> "$RUNS/times.txt"
