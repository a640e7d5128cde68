#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one go; docs/benchmarks.md records what it printed.
#
#   bash bench/gpu_all.sh OUTDIR [OFFICIAL_REPO TIMM_0_6_DIR]
#
# OUTDIR gets one log per step. With a checkout of aimagelab/MaPeT and a folder holding timm 0.6.x, the
# official step runs beside this project's (bench/official_step.py). Steps run in order of importance and
# each one's failure is logged without stopping the rest. STEPS="name ..." runs only the steps named.
set -uo pipefail
out=${1:?usage: bash bench/gpu_all.sh OUTDIR [OFFICIAL_REPO TIMM_0_6_DIR]}
official=()
[[ $# -ge 3 ]] && official=(--official "$2" --official-pythonpath "$3")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}

step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, report the exit status
    local name=$1
    shift
    [[ -z ${STEPS:-} || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*"
    local t=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.log"
step test_cuda "$py" -m pytest -p no:warnings -q -rs -s tests/test_cuda.py
step mapet_step_b8 "$py" bench/mapet_step.py --device cuda --sizes tiny small base --batch 8 --iters 20 \
    --warmup 5 "${official[@]}"
step mapet_step_b128 "$py" bench/mapet_step.py --device cuda --sizes small base --batch 128 --iters 10 \
    --warmup 3 "${official[@]}"
step mapet_step_b128_compile "$py" bench/mapet_step.py --device cuda --sizes base --batch 128 \
    --iters 10 --warmup 3 --compile "${official[@]}"
step loader_transfer "$py" bench/loader_transfer.py --workers 14
step tokenize "$py" bench/tokenize_throughput.py --device cuda --images 4096 --batch-size 64 --workers 14
step kmeans "$py" bench/kmeans_backends.py --n 200000 --dim 768 --k 1024 8192 --niter 10
