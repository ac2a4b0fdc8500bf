#!/usr/bin/env bash
# Issue 31's GPU figures in one command, for a device machine with no network: run from the repository root
# with the wheels of bench/gpu_wheels.sh in .whl/ (the run call's `carry`). It installs them into python3's
# own environment (bench.rounds' memory probe starts a fresh python3 with PYTHONPATH set to the repository
# alone), then runs each bench under its own timeout, most important first, each one's output in
# $OUT/<bench>.txt:
#   train_step  Stage-1 tokens/s against its ideal (top-k x the dense MLP's FLOPs at the measured dense rate)
#   moe_layer   one MoE layer, forward and backward, bf16, with each expert kernel forced as well
#   generate    prefill and decoding against the parent, demo and large, batch 1 and 16
#   rounds      a child after 1 and 8 rounds against its parent (demo, then large)
# The timeouts add up to 8 min 50 s, under 9 min 30 s with the install: a run call's timeout_s of 580 covers them.
# GPU_SMOKE=1 runs the same commands on the CPU with one repetition and small batches, to check here that
# the script runs to its end.
set -uo pipefail

OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DO_NOT_TRACK=true \
  MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false

{
  date -u
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl || exit 1
  nvidia-smi || echo "no nvidia-smi"
  python3 -c 'import sys, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
print("card:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none, CPU only")'
  nproc --all
  uptime
} 2>&1 | tee "$OUT/environment.txt" || exit 1

if [ "${GPU_SMOKE:-0}" = 1 ]; then
  device=cpu scale=20  # the CPU is far slower: each timeout 20 times longer
  train_step=(--steps 1 --warmup 0 --batch-size 1 --seq-len 32)
  moe_layer=(--reps 1 --warmup 0)
  generate=(--reps 1 --warmup 0 --prompt 8 --new-tokens 2)
  rounds=(--reps 1 --warmup 0 --prompt 8 --new-tokens 2 --load-reps 1)
  rounds_large=()
else
  device=cuda scale=1
  python3 -c 'import torch; assert torch.cuda.is_available()' || { echo "gpu.sh: error: no CUDA device; GPU_SMOKE=1 runs it on the CPU" >&2; exit 1; }
  train_step=(--steps 20 --warmup 3)
  moe_layer=(--reps 21 --warmup 3)
  generate=(--reps 5)
  rounds=()
  rounds_large=(--load-reps 2)  # each load rebuilds 2 GB from 9 versions on the CPU
fi

failed=()
# run NAME SECONDS ARGS...: one bench under its own timeout, its output shown and kept in $OUT/NAME.txt.
run() {
  local name=$1 seconds=$(($2 * scale))
  shift 2
  echo "== $name (timeout ${seconds}s): python3 -m $*" | tee "$OUT/$name.txt"
  local start=$SECONDS
  timeout --kill-after=5 "$seconds" python3 -m "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
  [ "$status" = 0 ] || failed+=("$name")
}

run train_step 75 bench.train_step --sizes demo large "${train_step[@]}"
run moe_layer 45 bench.moe_layer --device "$device" --dtype bf16 --kernels loop grouped_mm transformers:grouped_mm "${moe_layer[@]}"
run generate 110 bench.generate --sizes demo large --batches 1 16 "${generate[@]}"
run rounds_demo 60 bench.rounds --sizes demo --rounds 1 8 --batches 1 16 "${rounds[@]}"
run rounds_large 240 bench.rounds --sizes large --rounds 1 8 --batches 1 16 "${rounds[@]}" "${rounds_large[@]}"

echo "gpu.sh: done in $SECONDS s; failed: ${failed[*]:-none}" | tee -a "$OUT/environment.txt"
[ ${#failed[@]} = 0 ]
