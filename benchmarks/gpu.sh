#!/usr/bin/env bash
# The GPU campaign, one script: build mas_fast._C with the CUDA kernels, run the CUDA and
# Triton tests on the GPU, then the GPU benchmarks (penalty and fused AdamW at 100M fp32
# parameters; exact per-sample importance vs batch mode, vmap and Opacus; the proximal fused
# optimizer steps vs the explicit ones on cuda and triton).
# JSON results (device name, torch/CUDA versions, sizes, times, ratios) and the logs go to
# $OUT (default benchmarks/results). Each step has its own time limit so that the whole run
# stays under 8 minutes on an H100; a failed step is reported and the next one still runs.
# Usage, on a machine with a GPU and torch/triton/nvcc/pytest installed:
#   OUT=/some/dir bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAS_FAST_REQUIRE_EXT=1 MAS_FAST_BENCH_OUT=$OUT PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
status=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
  [ $rc -eq 0 ] || status=1
}

step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 20 "$PY" -m mas_fast info
step bench_cuda 80 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_cuda.py --benchmark-columns=median
step test_cuda 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py tests/test_memory.py \
    tests/test_bad_inputs.py -k "cuda or gpu or GPU"
step bench_importance 120 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_importance.py -k "cuda or bars" \
    --benchmark-columns=median
step bench_proximal 120 "$PY" -m pytest -q -s -p no:cacheprovider benchmarks/bench_optim.py \
    -k "test_proximal_step and cuda or test_proximal_goal"
step test_triton 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton_ops.py tests/test_triton_end_to_end.py
step test_properties 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_properties.py -k cuda
ls -l "$OUT"
exit $status
