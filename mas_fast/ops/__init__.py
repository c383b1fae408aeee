"""The kernel boundary: one Python function per op, dispatched to a backend.

Backends are modules with the same op functions as `reference.py` plus:
- `OPS`: the names of the ops they implement;
- `unavailable_reason() -> str | None`: why the backend cannot run at all (not built,
  no GPU, …) or None;
- `not_supported_reasons(op, tensors) -> list[str]`: why it cannot run these inputs;
- optionally `AUTO_DEVICES`: the device types "auto" may pick it for (default: any). The
  Triton interpreter runs CPU tensors when asked explicitly, but is never a fast choice.

"auto" takes the first backend in `PRIORITY` that implements the op, is auto-eligible for
the tensors' device and has no reasons (like xformers' dispatch). An explicit backend runs
every op it implements and raises with all the reasons when it cannot; ops it does not
implement run on the reference.
Every backend's `penalty` must be differentiable w.r.t. the parameters.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional, Sequence

import torch

from . import reference
from .optim_config import AdamConfig, SGDConfig

Tensor = torch.Tensor

BACKENDS = ("reference", "cpp", "triton", "cuda")
PRIORITY = ("cuda", "triton", "cpp", "reference")
_MODULES = {
    "reference": "mas_fast.ops.reference",
    "cpp": "mas_fast.ops.cpp",
    "triton": "mas_fast.ops.triton",
    "cuda": "mas_fast.ops.cuda",
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given op on the given inputs."""


def check_backend(backend: str) -> str:
    """Validate a backend name ("auto" or one of BACKENDS); returns it. Also loads the backends
    (once), so that a later torch.compile trace only reads the loaded table."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not torch.compiler.is_compiling():
        _load_all()
    return backend


_LOADED: dict[str, tuple[Optional[ModuleType], Optional[str]]] = {}


def _load_all() -> None:
    """Import every backend once and record whether it can run here (and why not)."""
    for name in BACKENDS:
        if name in _LOADED:
            continue
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            _LOADED[name] = None, f"backend {name!r} is not installed ({exc})"
            continue
        reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
        _LOADED[name] = (None, reason) if reason else (module, None)


def _load(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) when the backend can run here, else (None, reason)."""
    if name not in _LOADED:
        if torch.compiler.is_compiling():  # imports cannot be traced: load eagerly first
            raise RuntimeError("mas_fast backends are loaded on first use; call mas_fast.ops.backend_status() "
                               "(or construct MAS / a mas_fast optimizer) once before torch.compile")
        _load_all()
    return _LOADED[name]


def backend_status() -> dict[str, Optional[str]]:
    """Backend name → None when usable here, else the reason it is not."""
    return {name: _load(name)[1] for name in BACKENDS}


def _reasons(module: ModuleType, op: str, tensors: Sequence[Tensor]) -> list[str]:
    if module is reference:
        return []
    return list(module.not_supported_reasons(op, list(tensors)))


def select(op: str, backend: str, tensors: Sequence[Tensor]) -> ModuleType:
    """The backend module that runs `op` on `tensors` (see the module docstring)."""
    check_backend(backend)
    if backend == "auto":
        devices = {t.device.type for t in tensors}
        for name in PRIORITY:
            module, _ = _load(name)
            if (module is not None and op in getattr(module, "OPS", ())
                    and devices <= set(getattr(module, "AUTO_DEVICES", devices))
                    and not _reasons(module, op, tensors)):
                return module
        return reference
    module, why = _load(backend)
    if module is None:
        raise BackendUnavailable(f"backend {backend!r} cannot run: {why}")
    if module is not reference and op not in module.OPS:
        return reference
    reasons = _reasons(module, op, tensors)
    if reasons:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
    return module


def _flat(*groups: Sequence[Tensor]) -> list[Tensor]:
    return [t for g in groups for t in g]


# --------------------------------------------------------------------------- importance ops


def abs_matmul(delta: Tensor, x: Tensor, *, backend: str = "auto") -> Tensor:
    """Σ_n |δ_n||x_n|ᵀ, delta (N, O), x (N, I) → (O, I) fp32/fp64. See reference.abs_matmul."""
    return select("abs_matmul", backend, (delta, x)).abs_matmul(delta, x)


def per_sample_abs_matmul(delta: Tensor, x: Tensor, *, backend: str = "auto") -> Tensor:
    """Σ_k |Σ_t δ_kgt x_kgtᵀ|, (B,G,T,O), (B,G,T,I) → (G,O,I). See reference."""
    return select("per_sample_abs_matmul", backend, (delta, x)).per_sample_abs_matmul(delta, x)


def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Σ_k |Σ_t δ_ktc s_ktc|, (B,T,C) → (C,): bias and norm-affine importance."""
    tensors = (delta,) if scale is None else (delta, scale)
    return select("per_sample_abs_sum", backend, tensors).per_sample_abs_sum(delta, scale)


def conv_abs_grad(delta: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, *,
                  backend: str = "auto") -> Tensor:
    """Per-sample |conv2d weight gradient| summed over samples. See reference.conv_abs_grad."""
    impl = select("conv_abs_grad", backend, (delta, x))
    return impl.conv_abs_grad(delta, x, weight_shape, stride, padding, dilation, groups)


def embedding_abs_grad(indices: Tensor, delta: Tensor, num_embeddings: int,
                       padding_idx: Optional[int] = None, *, backend: str = "auto") -> Tensor:
    """Per-sample |embedding gradient| summed over samples. See reference.embedding_abs_grad."""
    impl = select("embedding_abs_grad", backend, (delta,))
    return impl.embedding_abs_grad(indices, delta, num_embeddings, padding_idx)


# --------------------------------------------------------------------------- state ops


def running_mean_update_(means: Sequence[Tensor], compensations: Sequence[Tensor],
                         batch_sums: Sequence[Tensor], count: int, batch_count: int, *, backend: str = "auto") -> None:
    """Fold batch sums into Kahan-compensated running means. See reference."""
    impl = select("running_mean_update_", backend, _flat(means, compensations, batch_sums))
    impl.running_mean_update_(means, compensations, batch_sums, count, batch_count)


def merge_(dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float, *,
           backend: str = "auto") -> None:
    """dst ← a·dst + b·src per tensor (Ω merge across tasks)."""
    select("merge_", backend, _flat(dst, src)).merge_(dst, src, a, b)


def penalty(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
            lam: float, *, backend: str = "auto") -> Tensor:
    """λ Σ Ω (θ − θ*)², differentiable w.r.t. params."""
    return select("penalty", backend, _flat(params, theta_star, omega)).penalty(params, theta_star, omega, lam)


def penalty_and_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                      omega: Sequence[Tensor], lam: float, *, backend: str = "auto") -> Tensor:
    """grads += 2λΩ(θ − θ*) in place; returns the penalty value (detached)."""
    impl = select("penalty_and_grad_", backend, _flat(params, grads, theta_star, omega))
    return impl.penalty_and_grad_(params, grads, theta_star, omega, lam)


# --------------------------------------------------------------------------- fused optimizer steps


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: SGDConfig, *,
              init_buffers: bool = False, backend: str = "auto") -> Tensor:
    """torch.optim.SGD step on g + 2λΩ(θ−θ*), or with config.penalty_step="proximal" on g then
    θ ← θ* + (θ'−θ*)/(1 + 2·lr·λΩ) (plain where θ* is empty); returns the penalty before it.

    momentum_buffers: one per parameter when config.momentum != 0 (else empty); with
    `init_buffers` they hold no history yet and are set to the gradient (the first step).
    """
    impl = select("sgd_step_", backend, _flat(params, grads, momentum_buffers, theta_star, omega))
    return impl.sgd_step_(params, grads, momentum_buffers, theta_star, omega, lam, config, init_buffers)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
               theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: AdamConfig, *,
               backend: str = "auto") -> Tensor:
    """torch.optim.Adam(W) step on g + 2λΩ(θ−θ*), or with config.penalty_step="proximal" on g
    then θ ← θ* + (θ'−θ*)/(1 + 2·lr·λΩ) (plain where θ* is empty); returns the penalty before it.

    `steps` are torch.optim's per-parameter step counters (incremented first); max_exp_avg_sqs
    is empty without config.amsgrad.
    """
    impl = select("adam_step_", backend,
                  _flat(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, theta_star, omega))
    return impl.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega,
                           lam, config)


__all__ = [
    "BACKENDS", "PRIORITY", "BackendUnavailable", "backend_status", "check_backend", "select",
    "abs_matmul", "per_sample_abs_matmul", "per_sample_abs_sum", "conv_abs_grad",
    "embedding_abs_grad", "running_mean_update_", "merge_", "penalty", "penalty_and_grad_",
    "sgd_step_", "adam_step_", "SGDConfig", "AdamConfig", "reference",
]
