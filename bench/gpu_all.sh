#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one go; docs/benchmarks.md records what it printed.
#
#   bash bench/gpu_all.sh OUTDIR [OFFICIAL_REPO TIMM_0_6_DIR]
#
# OUTDIR gets one log per step. With a checkout of aimagelab/MaPeT and a folder holding timm 0.6.x, the
# official step runs beside this project's (bench/official_step.py). Steps run in order of importance and
# each one's failure is logged without stopping the rest. STEPS="name ..." runs only the steps named. Each
# step is stopped after its time limit (seconds, the second argument of `step`), so a slow step costs its
# limit and no more. On an H200 (2026-11-26) test_cuda took 97-129 s, mapet_step_b8 92 s, mapet_step_b128
# 81 s, mapet_step_b8_cudagraphs 205 s, tokenize 63 s, online 48 s, loader_transfer 6 s; on an H100 (same
# day) test_cuda 113 s (before its two CUDA-graph tests), mapet_step_b8 109 s, mapet_step_b128 111 s,
# mapet_step_b8_cudagraphs 127-208 s; on an H100 that evening test_cuda (16 tests then) 99 s with pytest-xdist's
# -n 6 (used when xdist is installed), mapet_step_b8_cudagraphs_ckpt with the ViT-T half of
# mapet_step_b8_cudagraphs about 480 s. The limits sum to 55 minutes, so a 10-minute call runs a few steps.
# Beyond torch, torchvision and timm the project needs open_clip_torch (with ftfy, wcwidth), zarr (with
# numcodecs, donfig, crc32c, google-crc32c), webdataset, braceexpand; faiss-cpu for one k-means test.
set -uo pipefail
out=${1:?usage: bash bench/gpu_all.sh OUTDIR [OFFICIAL_REPO TIMM_0_6_DIR]}
official=()
[[ $# -ge 3 ]] && official=(--official "$2" --official-pythonpath "$3")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}

step() {  # step NAME LIMIT COMMAND...: run for at most LIMIT s, log to OUTDIR/NAME.log, report the exit
    local name=$1 limit=$2
    shift 2
    [[ -z ${STEPS:-} || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*"
    local t=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 124 ]] && echo "== $name: stopped at its limit of $limit s"
    echo "== $name: exit $rc after $((SECONDS - t)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.log"
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 6)
step test_cuda 480 "$py" -m pytest -p no:warnings -v -rs "${xdist[@]}" tests/test_cuda.py
step mapet_step_b8 150 "$py" bench/mapet_step.py --device cuda --sizes tiny small base --batch 8 --iters 20 \
    --warmup 5 "${official[@]}"
step mapet_step_b128 150 "$py" bench/mapet_step.py --device cuda --sizes small base --batch 128 --iters 10 \
    --warmup 3 "${official[@]}"
step mapet_step_b128_compile 300 "$py" bench/mapet_step.py --device cuda --sizes base --batch 128 \
    --iters 10 --warmup 3 --compile "${official[@]}"
step mapet_step_b8_compile 300 "$py" bench/mapet_step.py --device cuda --sizes tiny base --batch 8 \
    --iters 20 --warmup 5 --compile "${official[@]}"
step mapet_step_b8_cudagraphs 300 "$py" bench/mapet_step.py --device cuda --sizes tiny base --batch 8 \
    --iters 20 --warmup 5 --compile reduce-overhead "${official[@]}"
step mapet_step_b8_cudagraphs_ckpt 300 "$py" bench/mapet_step.py --device cuda --sizes tiny base --batch 8 \
    --iters 20 --warmup 5 --compile reduce-overhead --grad-checkpointing "${official[@]}"
step mapet_step_b8_sdpa 150 "$py" bench/mapet_step.py --device cuda --sizes tiny base --batch 8 --iters 20 \
    --warmup 5 --attn-backend sdpa "${official[@]}"
step mapet_step_b128_sdpa 150 "$py" bench/mapet_step.py --device cuda --sizes small base --batch 128 --iters 10 \
    --warmup 3 --attn-backend sdpa "${official[@]}"
step mapet_step_b8_profile 120 "$py" bench/mapet_step.py --device cuda --sizes base --batch 8 --iters 5 \
    --warmup 3 --profile 5
step mapet_step_b8_ckpt 150 "$py" bench/mapet_step.py --device cuda --sizes tiny base --batch 8 --iters 20 \
    --warmup 5 --grad-checkpointing "${official[@]}"
step mapet_step_b128_ckpt 150 "$py" bench/mapet_step.py --device cuda --sizes small base --batch 128 --iters 10 \
    --warmup 3 --grad-checkpointing "${official[@]}"
step online 120 "$py" bench/mapet_step.py --device cuda --sizes small --batch 128 --iters 10 --warmup 3 --online
step loader_transfer 60 "$py" bench/loader_transfer.py --workers 14
step tokenize 180 "$py" bench/tokenize_throughput.py --device cuda --images 8192 --batch-size 64 --workers 14 \
    --repeats 2
step kmeans 240 "$py" bench/kmeans_backends.py --n 200000 --dim 768 --k 1024 8192 --niter 10
