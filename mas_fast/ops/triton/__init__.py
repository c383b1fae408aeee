"""The "triton" backend: Triton kernels for the importance GEMMs, reductions, state ops and the
fused optimizer steps.

Same op functions as `mas_fast.ops.reference` (see the dispatch contract in
`mas_fast.ops`). On CUDA tensors the kernels are compiled and autotuned; with
TRITON_INTERPRET=1 set before this package is imported they also run on CPU tensors in
Triton's interpreter (slow: for tests), which "auto" never picks.
Inputs may be fp32, bf16 or fp16 with any strides; results are fp32 (fp32 accumulation). The
penalty and the steps also read the lean state (θ* in the parameters' dtype, Ω in bf16) as it is.
fp64 inputs are refused with a reason, so that dispatch keeps them on the reference.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..optim_config import AdamConfig, SGDConfig
from ..policy import state_dtypes_allowed

Tensor = torch.Tensor

try:
    import triton  # noqa: F401
except ImportError as exc:  # the backend reports itself unavailable instead of failing to import
    _IMPORT_ERROR: Optional[str] = f"triton is not installed ({exc}); pip install triton"
    INTERPRET = False
else:
    _IMPORT_ERROR = None
    from . import custom_ops as _lib
    from ._runtime import INTERPRET, capability

OPS = ("abs_matmul", "per_sample_abs_matmul", "per_sample_abs_sum", "conv_abs_grad",
       "running_mean_update_", "merge_", "penalty", "penalty_and_grad_", "sgd_step_", "adam_step_")
# "auto" uses the compiled kernels on GPUs only; the interpreter is for explicit requests.
AUTO_DEVICES = frozenset() if INTERPRET else frozenset({"cuda"})

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason() -> Optional[str]:
    """Why the backend cannot run here at all, or None."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return ("no GPU: Triton kernels need CUDA (set TRITON_INTERPRET=1 before importing mas_fast "
                "to run them on CPU tensors in the slow interpreter)")
    return None


def not_supported_reasons(op: str, tensors: Sequence[Tensor]) -> list[str]:
    """Why this backend cannot run `op` on `tensors` (empty when it can)."""
    reasons = []
    if op not in OPS:
        reasons.append(f"the triton backend has no {op} kernel")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on several devices ({', '.join(sorted(map(str, devices)))})")
    for kind in sorted({d.type for d in devices}):
        if kind == "cpu" and not INTERPRET:
            reasons.append("CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1 before import)")
        elif kind not in ("cpu", "cuda"):
            reasons.append(f"{kind} tensors are not supported (CUDA, or CPU in the interpreter)")
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes:
        reasons.append("float64 inputs are not supported (the kernels accumulate in float32); "
                       "use the reference backend")
    others = sorted(str(d) for d in dtypes - set(_DTYPES) - {torch.float64})
    if others:
        reasons.append(f"unsupported dtypes {others} (fp32, bf16 and fp16 only)")
    if torch.bfloat16 in dtypes and not INTERPRET and any(
            d.type == "cuda" and capability(d) < (8, 0) for d in devices):
        reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
    return reasons


# --------------------------------------------------------------------------- checks


def _check_dims(name: str, t: Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_lists(**lists: Sequence[Tensor]) -> int:
    """Equal lengths and matching sizes per position (the kernels index them together)."""
    (first, ref), *rest = lists.items()
    for name, other in rest:
        if len(other) != len(ref):
            raise ValueError(f"{name} has {len(other)} tensors, {first} has {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, other)):
            if a.shape != b.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(b.shape)}, {first}[{i}] has {tuple(a.shape)}")
    return len(ref)


def _check_fp32(**lists: Sequence[Tensor]) -> None:
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.dtype != torch.float32:
                raise TypeError(f"{name}[{i}] must be float32 (Ω, θ* and running means are fp32), got {t.dtype}")


# --------------------------------------------------------------------------- importance ops


def abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_n |δ_n||x_n|ᵀ for delta (N, O), x (N, I) → fp32 (O, I). See reference.abs_matmul."""
    _check_dims("delta", delta, 2)
    _check_dims("x", x, 2)
    if delta.shape[0] != x.shape[0]:
        raise ValueError(f"delta {tuple(delta.shape)} and x {tuple(x.shape)} differ in rows")
    return _lib.abs_matmul(delta, x)


def per_sample_abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_k |Σ_t δ_kgt x_kgtᵀ| for (B, G, T, O), (B, G, T, I) → fp32 (G, O, I)."""
    _check_dims("delta", delta, 4)
    _check_dims("x", x, 4)
    if delta.shape[:3] != x.shape[:3]:
        raise ValueError(f"delta {tuple(delta.shape)} and x {tuple(x.shape)} differ in (B, G, T)")
    return _lib.per_sample_abs_matmul(delta, x)


def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Σ_k |Σ_t δ_ktc s_ktc| for (B, T, C) → fp32 (C,). See reference.per_sample_abs_sum."""
    _check_dims("delta", delta, 3)
    if scale is not None and scale.shape != delta.shape:
        raise ValueError(f"scale {tuple(scale.shape)} must have delta's shape {tuple(delta.shape)}")
    return _lib.per_sample_abs_sum(delta, scale)


def conv_abs_grad(delta: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """Per-sample |conv2d weight gradient| summed over samples (implicit GEMM). See reference."""
    _check_dims("delta", delta, 4)
    _check_dims("x", x, 4)
    geometry = dict(weight_shape=weight_shape, stride=stride, padding=padding, dilation=dilation)
    lens = {"weight_shape": 4, "stride": 2, "padding": 2, "dilation": 2}
    for name, value in geometry.items():
        if len(value) != lens[name]:
            raise ValueError(f"{name} must have {lens[name]} entries, got {tuple(value)}")
    c_out, c_in_g = weight_shape[:2]
    if groups < 1 or delta.shape[1] != c_out or x.shape[1] != c_in_g * groups or c_out % groups:
        raise ValueError(f"weight_shape {tuple(weight_shape)} with groups={groups} does not match "
                         f"delta {tuple(delta.shape)} and x {tuple(x.shape)}")
    if delta.shape[0] != x.shape[0]:
        raise ValueError(f"delta and x differ in batch size ({delta.shape[0]} vs {x.shape[0]})")
    as_ints = {name: [int(v) for v in value] for name, value in geometry.items()}
    return _lib.conv_abs_grad(delta, x, **as_ints, groups=int(groups))


# --------------------------------------------------------------------------- state ops


def running_mean_update_(means: Sequence[Tensor], compensations: Sequence[Tensor],
                         batch_sums: Sequence[Tensor], count: int, batch_count: int) -> None:
    """Kahan-compensated running means (multi-tensor). See reference.running_mean_update_."""
    if _check_lists(means=means, compensations=compensations, batch_sums=batch_sums):
        _check_fp32(means=means, compensations=compensations)
        _lib.running_mean_update_(list(means), list(compensations), list(batch_sums), int(count),
                                  int(batch_count))


def merge_(dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
    """dst ← a·dst + b·src per tensor (multi-tensor)."""
    if _check_lists(dst=dst, src=src):
        _check_fp32(dst=dst)
        _lib.merge_(list(dst), list(src), float(a), float(b))


def _check_state(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor]) -> None:
    """θ* in the parameter's accumulation dtype or its own (lean), Ω in the accumulation dtype or
    bfloat16 (lean): what the kernels read as it is (policy.state_dtypes_allowed)."""
    for i, p in enumerate(params):
        for name, t, allowed in zip(("theta_star", "omega"), (theta_star[i], omega[i]),
                                    state_dtypes_allowed(p.dtype)):
            if t.dtype not in allowed:
                raise TypeError(f"{name}[{i}] is {t.dtype}, expected {' or '.join(map(str, allowed))} "
                                f"(params[{i}] is {p.dtype})")


def _check_penalty(params, theta_star, omega, grads=None) -> int:
    lists = dict(params=params, theta_star=theta_star, omega=omega)
    n = _check_lists(**lists, **({} if grads is None else {"grads": grads}))
    _check_state(params, theta_star, omega)
    for i, g in enumerate(grads or ()):
        if g.dtype != params[i].dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but params[{i}] is {params[i].dtype}")
    return n


def penalty(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
            lam: float) -> Tensor:
    """λ Σ Ω (θ − θ*)² (fp32 scalar), differentiable w.r.t. `params`."""
    if not _check_penalty(params, theta_star, omega):
        return torch.zeros((), dtype=torch.float32)
    return _lib.penalty(list(params), list(theta_star), list(omega), float(lam))


def penalty_and_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                      omega: Sequence[Tensor], lam: float) -> Tensor:
    """grads += 2λΩ(θ − θ*) in place; returns the penalty (detached), in one pass."""
    if not _check_penalty(params, theta_star, omega, grads):
        return torch.zeros((), dtype=torch.float32)
    with torch.no_grad():
        return _lib.penalty_and_grad_([p.detach() for p in params], list(grads), list(theta_star),
                                      list(omega), float(lam))


# --------------------------------------------------------------------------- fused optimizer steps


def _check_like_params(params: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    """Each list matches params in length, shapes and dtypes (an empty list: not used)."""
    for name, ts in lists.items():
        if ts:
            _check_lists(params=params, **{name: ts})
            for i, (t, p) in enumerate(zip(ts, params)):
                if t.dtype != p.dtype:
                    raise TypeError(f"{name}[{i}] is {t.dtype} but params[{i}] is {p.dtype}")


def _check_step(params, grads, theta_star, omega, **state: Sequence[Tensor]) -> None:
    _check_lists(params=params, grads=grads)
    _check_like_params(params, grads=grads, **state)
    if theta_star or omega:
        _check_lists(params=params, theta_star=theta_star, omega=omega)
        _check_state(params, theta_star, omega)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: SGDConfig,
              init_buffers: bool) -> Tensor:
    """Fused SGD + MAS step, one multi-tensor launch per dtype (see mas_fast.ops.sgd_step_)."""
    _check_step(params, grads, theta_star, omega, momentum_buffers=momentum_buffers)
    if config.momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(f"momentum_buffers has {len(momentum_buffers)} tensors, expected {len(params)}")
    c = config
    with torch.no_grad():
        return _lib.sgd_step_([p.detach() for p in params], list(grads), list(momentum_buffers),
                              list(theta_star), list(omega), float(lam), float(c.lr), float(c.momentum),
                              float(c.dampening), float(c.weight_decay), bool(c.nesterov), bool(c.maximize),
                              bool(init_buffers), c.proximal)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
               theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: AdamConfig) -> Tensor:
    """Fused Adam(W) + MAS step, one launch per dtype and step count (see mas_fast.ops.adam_step_)."""
    _check_step(params, grads, theta_star, omega, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_exp_avg_sqs)
    for name, ts in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps),
                     *((("max_exp_avg_sqs", max_exp_avg_sqs),) if config.amsgrad else ())):
        if len(ts) != len(params):
            raise ValueError(f"{name} has {len(ts)} tensors, expected {len(params)}")
    for i, s in enumerate(steps):
        if s.numel() != 1 or not s.is_floating_point():
            raise ValueError(f"steps[{i}] must be a one-element floating-point counter, got {tuple(s.shape)} "
                             f"{s.dtype}")
    c = config
    with torch.no_grad():
        return _lib.adam_step_([p.detach() for p in params], list(grads), list(exp_avgs), list(exp_avg_sqs),
                               list(max_exp_avg_sqs), list(steps), list(theta_star), list(omega), float(lam),
                               float(c.lr), float(c.beta1), float(c.beta2), float(c.eps), float(c.weight_decay),
                               bool(c.decoupled_weight_decay), bool(c.amsgrad), bool(c.maximize), c.proximal)


__all__ = ["OPS", "AUTO_DEVICES", "unavailable_reason", "not_supported_reasons", *OPS]
