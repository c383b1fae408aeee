"""Python-side registrations for the custom ops that csrc/ops.cpp declares (torch.ops.mas_fast.*).

- Fake (meta) implementations: output shapes/dtypes without computing, so that
  `torch.compile` traces the ops without graph breaks (and torch.library.opcheck passes).
- The autograd formula of `penalty`: ∂/∂θ λΣΩ(θ−θ*)² = 2λΩ(θ−θ*), computed by the
  `penalty_backward` op.

Imported by mas_fast.ops.cpp right after mas_fast._C is loaded; the C++ library names this
module (set_python_module), so torch imports it by itself when it needs a fake.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .policy import penalty_dtype

Tensor = torch.Tensor


def _scalar(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor]) -> Tensor:
    """The 0-dim penalty value in the dtype reference.py returns (policy.penalty_dtype), on the
    parameters' device (where the kernels reduce it)."""
    return torch.empty((), dtype=penalty_dtype(theta_star, omega), device=params[0].device if params else "cpu")


@torch.library.register_fake("mas_fast::penalty")
def _penalty_fake(params, theta_star, omega, lam):
    return _scalar(params, theta_star, omega)


@torch.library.register_fake("mas_fast::penalty_backward")
def _penalty_backward_fake(grad_out, params, theta_star, omega, lam):
    return [p.new_empty(p.shape) for p in params]


@torch.library.register_fake("mas_fast::penalty_and_grad_")
def _penalty_and_grad_fake(params, grads, theta_star, omega, lam):
    return _scalar(params, theta_star, omega)


@torch.library.register_fake("mas_fast::merge_")
def _merge_fake(dst, src, a, b) -> None:
    return None


@torch.library.register_fake("mas_fast::running_mean_update_")
def _running_mean_update_fake(means, compensations, batch_sums, count, batch_count) -> None:
    return None


@torch.library.register_fake("mas_fast::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, theta_star, omega, lam, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, init_buffers, proximal=False):
    return _scalar(params, theta_star, omega)


@torch.library.register_fake("mas_fast::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, lam,
                    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                    proximal=False):
    return _scalar(params, theta_star, omega)


@torch.library.register_fake("mas_fast::per_sample_abs_sum")
def _per_sample_abs_sum_fake(delta, scale):
    return delta.new_empty((delta.shape[2],), dtype=torch.float32)


@torch.library.register_fake("mas_fast::per_sample_abs_matmul")
def _per_sample_abs_matmul_fake(delta, x):
    dtype = torch.float64 if torch.float64 in (delta.dtype, x.dtype) else torch.float32
    return delta.new_empty((delta.shape[1], delta.shape[3], x.shape[3]), dtype=dtype)


def _penalty_setup_context(ctx, inputs, output) -> None:
    params, theta_star, omega, lam = inputs
    ctx.count = len(params)
    ctx.lam = lam
    ctx.save_for_backward(*params, *theta_star, *omega)


def _penalty_backward(ctx, grad: Tensor) -> tuple[list[Tensor], list[None], list[None], None]:
    n = ctx.count
    saved = ctx.saved_tensors
    grads = torch.ops.mas_fast.penalty_backward(grad, list(saved[:n]), list(saved[n:2 * n]),
                                                list(saved[2 * n:]), ctx.lam)
    return list(grads), [None] * n, [None] * n, None


torch.library.register_autograd("mas_fast::penalty", _penalty_backward, setup_context=_penalty_setup_context)

