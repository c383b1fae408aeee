"""The "cpp" backend: multi-tensor OpenMP CPU kernels of the mas_fast._C extension (csrc/).

Each op is one call over all parameters (torch.ops.mas_fast.*; schemas in csrc/ops.cpp, fake
implementations and the penalty's autograd formula in cpp_registrations.py, so the ops trace
under torch.compile). Parameters and grads: float32/float64/bfloat16/float16; θ* in the
parameter's accumulation dtype (float32, float64 for float64 parameters) or, in the lean state,
its own dtype; Ω in the accumulation dtype or bfloat16 (lean). The kernels read the lean state as
it is, widening on load. Non-contiguous tensors work (through a contiguous copy).
The penalty is accumulated in float64 per 65,536-element chunk, chunks added in a fixed
order: deterministic and independent of the thread count (torch.get_num_threads()); the value
is returned as reference.py returns it (policy.penalty_dtype, inf beyond its range, never an
error).
Per-sample importance (per_sample_abs_matmul, conv_abs_grad) runs the fused kernel of
csrc/cpu/importance.cpp on the shapes where it beats the reference, the reference elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import reference
from .optim_config import AdamConfig, SGDConfig
from .policy import acc_dtype, samples_per_chunk

Tensor = torch.Tensor

# Written by setup.py: per extension, None (built) or why it is missing.
BUILD_STATUS = Path(__file__).resolve().parent.parent / "_build_status.json"

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.mas_fast.*)
except ImportError as exc:
    _IMPORT_ERROR: Optional[str] = str(exc)
else:
    _IMPORT_ERROR = None
    from . import cpp_registrations  # noqa: F401  (fake implementations, autograd of penalty)

OPS = frozenset({"penalty", "penalty_and_grad_", "merge_", "running_mean_update_", "sgd_step_", "adam_step_",
                 "per_sample_abs_matmul", "conv_abs_grad"})
AUTO_DEVICES = frozenset({"cpu"})

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.float64)
_STATE_OPS = ("merge_", "running_mean_update_")

# Where the fused per-sample kernel beats the reference's batched GEMM (MKL) + |·| + sum,
# measured on AVX-512 at B = 32 (docs/benchmarks.md): few positions per sample (2 ≤ T ≤ 16:
# 1.45-23×); from T ≈ 32 the batched GEMM is faster, at T = 1 the reference's single GEMM of
# absolute values is exact and faster, and below 4 output rows per group (depthwise
# convolutions) the kernel's row tiles are mostly padding.
KERNEL_POSITIONS = range(2, 17)
KERNEL_MIN_ROWS = 4


def build_failure(extension: str) -> Optional[str]:
    """Why setup.py did not build `extension` ("mas_fast._C", "mas_fast._C_cuda"), as it
    recorded at build time; None when it built or no build recorded anything."""
    try:
        return json.loads(BUILD_STATUS.read_text()).get(extension)
    except (OSError, ValueError, AttributeError):
        return None


def unavailable_reason() -> Optional[str]:
    """Why the backend cannot run here (extension not built, and why), or None."""
    if _IMPORT_ERROR is None:
        return None
    failure = build_failure("mas_fast._C")
    if failure:
        return f"the C++ extension mas_fast._C is not built: {failure}"
    return (f"the C++ extension mas_fast._C is not built ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` where a C++ compiler exists")


def dtype_reasons(op: str, tensors: Sequence[Tensor], allowed: Sequence[torch.dtype] = ()) -> list[str]:
    """Why the extension's kernels cannot take these dtypes for `op` (empty when they can)."""
    allowed = allowed or (_STATE_DTYPES if op in _STATE_OPS else _PARAM_DTYPES)
    dtypes = sorted({str(t.dtype) for t in tensors if t.dtype not in allowed})
    if dtypes:
        return [f"{op} supports {', '.join(str(d) for d in allowed)}; got {', '.join(dtypes)}"]
    return []


def not_supported_reasons(op: str, tensors: Sequence[Tensor]) -> list[str]:
    """Why these kernels cannot run `op` on `tensors` (devices, dtypes)."""
    reasons = []
    devices = sorted({t.device.type for t in tensors} - {"cpu"})
    if devices:
        reasons.append(f"the cpp backend runs CPU tensors only, got tensors on {', '.join(devices)}")
    return reasons + dtype_reasons(op, tensors)


def _kernel_pays(positions: int, rows: int) -> bool:
    return positions in KERNEL_POSITIONS and rows >= KERNEL_MIN_ROWS


def per_sample_abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_k |Σ_t δ_kgt x_kgtᵀ| (see reference.per_sample_abs_matmul): the fused kernel where it
    is faster than the reference (KERNEL_POSITIONS), the reference elsewhere."""
    if delta.dim() == 4 and not _kernel_pays(delta.shape[2], delta.shape[3]):
        return reference.per_sample_abs_matmul(delta, x)
    return torch.ops.mas_fast.per_sample_abs_matmul(delta, x)


def conv_abs_grad(delta: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """Σ_k |per-sample conv2d weight gradient| (see reference.conv_abs_grad): the unfolded input
    of a chunk of samples through the fused kernel, where it pays; the reference elsewhere."""
    B, Cout, Ho, Wo = delta.shape
    L, O = Ho * Wo, Cout // groups
    if not _kernel_pays(L, O):
        return reference.conv_abs_grad(delta, x, weight_shape, stride, padding, dilation, groups)
    kh, kw = weight_shape[-2:]
    dt = acc_dtype(delta.dtype, x.dtype)
    out = torch.zeros(groups, O, x.shape[1] // groups * kh * kw, dtype=dt, device=delta.device)
    step = samples_per_chunk(x.shape[1] * kh * kw * L, B)
    for s in range(0, B, step):
        xs = x[s:s + step]
        c = xs.shape[0]
        u = torch.nn.functional.unfold(xs, (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                                       stride=tuple(stride))  # (c, Cin*kh*kw, L)
        u = u.view(c, groups, -1, L).transpose(-1, -2)  # (c, G, L, I)
        d = delta[s:s + step].reshape(c, groups, O, L).transpose(-1, -2)  # (c, G, L, O)
        out += torch.ops.mas_fast.per_sample_abs_matmul(d, u)
    return out.reshape(weight_shape)


def penalty(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
            lam: float) -> Tensor:
    """λ Σ Ω (θ − θ*)², differentiable w.r.t. params (backward: the penalty_backward kernel)."""
    if not params:  # the dispatcher needs at least one tensor
        return reference.penalty(params, theta_star, omega, lam)
    return torch.ops.mas_fast.penalty(list(params), list(theta_star), list(omega), float(lam))


def penalty_and_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                      omega: Sequence[Tensor], lam: float) -> Tensor:
    """grads += 2λΩ(θ − θ*) in one pass that also returns λΣΩ(θ − θ*)²."""
    if not params:
        return reference.penalty_and_grad_(params, grads, theta_star, omega, lam)
    with torch.no_grad():
        return torch.ops.mas_fast.penalty_and_grad_(list(params), list(grads),
                                                    list(theta_star), list(omega), float(lam))


def merge_(dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
    """dst ← a·dst + b·src per tensor."""
    if dst:
        torch.ops.mas_fast.merge_(list(dst), list(src), float(a), float(b))


def running_mean_update_(means: Sequence[Tensor], compensations: Sequence[Tensor],
                         batch_sums: Sequence[Tensor], count: int, batch_count: int) -> None:
    """Kahan-compensated running-mean update (see reference.running_mean_update_)."""
    if means:
        torch.ops.mas_fast.running_mean_update_(list(means), list(compensations), list(batch_sums),
                                                int(count), int(batch_count))


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: SGDConfig,
              init_buffers: bool) -> Tensor:
    """Fused SGD + MAS step (see mas_fast.ops.sgd_step_)."""
    if not params:
        return torch.zeros(())
    c = config
    with torch.no_grad():
        return torch.ops.mas_fast.sgd_step_(
            list(params), list(grads), list(momentum_buffers), list(theta_star), list(omega),
            float(lam), float(c.lr), float(c.momentum), float(c.dampening), float(c.weight_decay),
            bool(c.nesterov), bool(c.maximize), bool(init_buffers), bool(c.proximal))


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
               theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: AdamConfig) -> Tensor:
    """Fused Adam(W) + MAS step (see mas_fast.ops.adam_step_)."""
    if not params:
        return torch.zeros(())
    c = config
    with torch.no_grad():
        return torch.ops.mas_fast.adam_step_(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(steps), list(theta_star), list(omega), float(lam), float(c.lr), float(c.beta1),
            float(c.beta2), float(c.eps), float(c.weight_decay), bool(c.decoupled_weight_decay),
            bool(c.amsgrad), bool(c.maximize), bool(c.proximal))
