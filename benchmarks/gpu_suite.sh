#!/usr/bin/env bash
# The accelerator benchmarks of issue 17 in one go, for an NVIDIA GPU (one device is enough):
#   1. hijax_attention.py      the one-op attention's rules, checked on this backend
#   2. train_mfu.py            sCM and flow-matching step time and MFU at FLUX width (depth
#                              reduced to fit), two attention set-ups: "auto" (cuDNN forward and
#                              backward, blockwise tangent: two student graphdefs) and "hijax"
#                              (one op for every pass: one graphdef)
#   3. generate_latency.py     1-step and 4-step 512 px generation by a FLUX.1-lite-sized student
#   4. jvp_attention_memory.py the tangent pass's attention memory at T = 4608, compiled for this
#                              backend
# Each benchmark's final JSON line goes into OUT/summary.jsonl, its output into OUT/NAME.log and its
# progress bars and warnings into OUT/NAME.err.
#
#   benchmarks/gpu_suite.sh [OUT]          on the GPU (after `make venv ACCEL=cuda`)
#   benchmarks/gpu_suite.sh --cpu-try OUT  the same programs at toy sizes, to try it on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

small=0
if [[ "${1:-}" == "--cpu-try" ]]; then
  small=1
  shift
fi
out="${1:-gpu_suite_out}"
mkdir -p "$out"
: >"$out/summary.jsonl"
py="${PYTHON:-.venv/bin/python}"

run() {  # run NAME ARGS...: one benchmark, its last line (the JSON) into the summary
  local name="$1"
  shift
  echo "== $name: $*" >&2
  local start=$SECONDS
  "$py" "benchmarks/$1" "${@:2}" 2>"$out/$name.err" | tee "$out/$name.log" | tail -n 1 >>"$out/summary.jsonl"
  echo "== $name: $((SECONDS - start)) s" >&2
}

if ((small)); then
  mfu=(--preset mid --latent 16 --batch 2 --dtype float32 --remat none --warmup 1 --steps 2)
  gen=(--preset tiny --vae tiny --size 64 --repeats 2)
  mem=(--tokens 256 32 --impls none plain blockwise --time-shape 1 64 2 16 --repeats 2)
else
  "$py" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  mfu=()
  gen=()
  mem=()
fi

run hijax_attention hijax_attention.py
run train_mfu_auto train_mfu.py "${mfu[@]}"
run train_mfu_hijax train_mfu.py "${mfu[@]}" --attn-impl hijax --jvp-attn-impl hijax
run generate_latency generate_latency.py "${gen[@]}"
run jvp_attention_memory jvp_attention_memory.py "${mem[@]}"
echo "summary: $out/summary.jsonl" >&2
cat "$out/summary.jsonl"
