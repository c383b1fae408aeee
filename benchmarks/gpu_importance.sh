#!/usr/bin/env bash
# Issue 6 on a GPU: the Triton kernel tests on CUDA tensors (compiled, autotuned), then the
# importance benchmark (per-sample Ω vs batch Ω, torch.func vmap, Opacus; time and peak
# memory). Results: benchmarks/results/importance-<gpu>.json (with the device name).
# Usage: benchmarks/gpu_importance.sh [extra pytest args for the benchmark]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_importance.sh: no GPU')"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_triton_end_to_end.py
"$PY" -m pytest -q -s -p no:cacheprovider benchmarks/bench_importance.py -k "cuda or bars" \
    --benchmark-columns=median,iqr "$@"
