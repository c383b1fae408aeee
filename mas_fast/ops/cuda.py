"""The "cuda" backend: the CUDA kernels of the mas_fast._C extension (csrc/cuda/).

The same custom ops as the "cpp" backend (torch.ops.mas_fast.*, dispatched by device), with
CUDA implementations: a multi-tensor launcher (tensor addresses in the kernel argument,
65,536-element chunks, one launch for up to ~50 tensors), the penalty reduced per block into
a fixed slot and summed in a fixed order (deterministic), fused SGD/Adam(W) steps with fp32
math for bf16/fp16 parameters, and the per-sample bias / norm-affine reduction of the
importance pass. Built only where nvcc and a CUDA build of torch exist at install time.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import cpp as _ext
from .cpp import (adam_step_, merge_, penalty, penalty_and_grad_, running_mean_update_,  # noqa: F401
                  sgd_step_)

Tensor = torch.Tensor

_IMPORT_ERROR: Optional[str] = None
if _ext.unavailable_reason() is None:  # the CUDA kernels register on the ops that mas_fast._C declares
    try:
        from .. import _C_cuda  # noqa: F401
    except ImportError as exc:
        _IMPORT_ERROR = str(exc)

OPS = frozenset({"penalty", "penalty_and_grad_", "merge_", "running_mean_update_", "sgd_step_", "adam_step_",
                 "per_sample_abs_sum"})
AUTO_DEVICES = frozenset({"cuda"})
_IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run here (not built, built without CUDA, no GPU), or None."""
    reason = _ext.unavailable_reason()
    if reason:
        return reason
    if _IMPORT_ERROR is not None:
        failure = _ext.build_failure("mas_fast._C_cuda")
        if failure:
            return f"mas_fast._C_cuda (the CUDA kernels): {failure}"
        return (f"the CUDA kernels (mas_fast._C_cuda) are not built ({_IMPORT_ERROR}); building them needs a "
                "CUDA toolkit (CUDA_HOME) and a CUDA build of torch")
    if not torch.cuda.is_available():
        return "no GPU"
    return None


def not_supported_reasons(op: str, tensors: Sequence[Tensor]) -> list[str]:
    """Why the CUDA kernels cannot run `op` on `tensors` (devices, dtypes)."""
    reasons = []
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices):
        reasons.append("the cuda backend runs CUDA tensors only, got tensors on "
                       + ", ".join(sorted({d.type for d in devices})))
    elif len(devices) > 1:
        reasons.append(f"tensors are on several GPUs ({', '.join(sorted(map(str, devices)))})")
    allowed = _IMPORTANCE_DTYPES if op == "per_sample_abs_sum" else ()
    return reasons + _ext.dtype_reasons(op, tensors, allowed)


def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Σ_k |Σ_t δ_ktc s_ktc| for (B, T, C) → fp32 (C,): bias and norm-affine importance."""
    return torch.ops.mas_fast.per_sample_abs_sum(delta, scale)
