#!/usr/bin/env bash
# Issue #17: the paper's Fashion-MNIST students, three seeds each, on the 2-core CPU.
#
#   EPOCHS=10 nohup nice -n 19 scripts/paper_students.sh > runs/paper/log.txt 2>&1 &
#
# Every student is the teacher member's architecture, ResNet-8x2 FRN-Swish (the configs'
# ResNet-8x1 students are one member's half width), trained for the same EPOCHS (the CPU
# budget; default 10) from the shipped MultiSWAG teachers (checkpoints_teacher/fmnist) with
# each config's recipe otherwise: KD, ProxyEnDD, Hydra and FED, then EDFM's head on each seed's
# KD student as its backbone. Runs go to runs/paper/<method>_s<seed>. Two lanes run side by side
# (one per core): KD then EDFM, and ProxyEnDD, Hydra, FED. Resumable: a finished run is skipped,
# an interrupted one continues from its last checkpoint (--resume), so the script can be started
# again in a later session. Each lane logs to runs/paper/<name>.log, finishing times to runs/paper/times.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-10}
SEEDS=(2025 2026 2027)
PY=.venv/bin/python
mkdir -p runs/paper

run() {  # name script config [extra flags...]
    local name=$1 script=$2 config=$3
    shift 3
    local dir=runs/paper/$name
    if [[ -f $dir/model/sidecar.json && -f $dir/finished ]]; then
        return 0
    fi
    local start=$SECONDS
    if [[ -f $dir/config.yaml ]]; then
        $PY "$script" --resume "$dir" > "$dir.log" 2>&1
    else
        $PY "$script" --config "$config" --model_width 2 --optim_ne "$EPOCHS" --save "$dir" "$@" \
            > "$dir.log" 2>&1
    fi
    local status=$?
    if ((status == 0)); then
        touch "$dir/finished"
    fi
    echo "$(date -u +%FT%TZ) $name exit $status, $((SECONDS - start)) s" >> runs/paper/times.txt
    return $status
}

lane_kd_edfm() {
    for seed in "${SEEDS[@]}"; do
        run "kd_s$seed" kd_and_endd.py config/distillation/kd_fmnist_frnrelu.yaml --seed "$seed"
    done
    for seed in "${SEEDS[@]}"; do
        run "edfm_s$seed" edfm.py config/distillation/edfm_fmnist_frnrelu.yaml --seed "$seed" \
            --pretrained_resnet "runs/paper/kd_s$seed" --test_table false
    done
}

lane_others() {
    for seed in "${SEEDS[@]}"; do
        run "endd_s$seed" kd_and_endd.py config/distillation/endd_fmnist_frnrelu.yaml --seed "$seed"
        run "hydra_s$seed" hydra.py config/distillation/hydra_fmnist_frnrelu.yaml --seed "$seed"
    done
    for seed in "${SEEDS[@]}"; do
        run "fed_s$seed" fed.py config/distillation/fed_fmnist_frnrelu.yaml --seed "$seed"
    done
}

lane_kd_edfm &
lane_others &
wait
echo "$(date -u +%FT%TZ) all done" >> runs/paper/times.txt
