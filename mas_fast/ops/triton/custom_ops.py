"""torch.library custom ops around the Triton kernels, so they trace under torch.compile.

Namespace `mas_fast_triton`: the C++ extension owns `mas_fast::`. Each op has a fake
(meta) implementation; `penalty` also has an autograd formula (2λΩ(θ − θ*)·grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op

from ..optim_config import AdamConfig, SGDConfig
from . import gemm, multi_tensor, optim, reduce

Tensor = torch.Tensor
NS = "mas_fast_triton"


def _fp32(*shape: int, like: Tensor) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@custom_op(f"{NS}::abs_matmul", mutates_args=())
def abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    return gemm.abs_matmul(delta, x)


@abs_matmul.register_fake
def _(delta, x):
    return _fp32(delta.shape[1], x.shape[1], like=delta)


@custom_op(f"{NS}::per_sample_abs_matmul", mutates_args=())
def per_sample_abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    return gemm.per_sample_abs_matmul(delta, x)


@per_sample_abs_matmul.register_fake
def _(delta, x):
    return _fp32(delta.shape[1], delta.shape[3], x.shape[3], like=delta)


@custom_op(f"{NS}::conv_abs_grad", mutates_args=())
def conv_abs_grad(delta: Tensor, x: Tensor, weight_shape: list[int], stride: list[int],
                  padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return gemm.conv_abs_grad(delta, x, weight_shape, stride, padding, dilation, groups)


@conv_abs_grad.register_fake
def _(delta, x, weight_shape, stride, padding, dilation, groups):
    return _fp32(*weight_shape, like=delta)


@custom_op(f"{NS}::per_sample_abs_sum", mutates_args=())
def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor]) -> Tensor:
    return reduce.per_sample_abs_sum(delta, scale)


@per_sample_abs_sum.register_fake
def _(delta, scale):
    return _fp32(delta.shape[2], like=delta)


@custom_op(f"{NS}::running_mean_update_", mutates_args=("means", "compensations"))
def running_mean_update_(means: list[Tensor], compensations: list[Tensor], batch_sums: list[Tensor],
                         count: int, batch_count: int) -> None:
    multi_tensor.running_mean_update_(means, compensations, batch_sums, count, batch_count)


@custom_op(f"{NS}::merge_", mutates_args=("dst",))
def merge_(dst: list[Tensor], src: list[Tensor], a: float, b: float) -> None:
    multi_tensor.merge_(dst, src, a, b)


@custom_op(f"{NS}::penalty_and_grad_", mutates_args=("grads",))
def penalty_and_grad_(params: list[Tensor], grads: list[Tensor], theta_star: list[Tensor],
                      omega: list[Tensor], lam: float) -> Tensor:
    return multi_tensor.penalty_and_grad_(params, grads, theta_star, omega, lam)


@penalty_and_grad_.register_fake
def _(params, grads, theta_star, omega, lam):
    return _fp32(like=omega[0])


@custom_op(f"{NS}::penalty_grad", mutates_args=())
def penalty_grad(params: list[Tensor], theta_star: list[Tensor], omega: list[Tensor], lam: float,
                 grad_out: Tensor) -> list[Tensor]:
    return multi_tensor.penalty_grad(params, theta_star, omega, lam, grad_out)


@penalty_grad.register_fake
def _(params, theta_star, omega, lam, grad_out):
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


@custom_op(f"{NS}::penalty", mutates_args=())
def penalty(params: list[Tensor], theta_star: list[Tensor], omega: list[Tensor], lam: float) -> Tensor:
    return multi_tensor.penalty(params, theta_star, omega, lam)


@penalty.register_fake
def _(params, theta_star, omega, lam):
    return _fp32(like=omega[0])


def _step_value_fake(params: list[Tensor]) -> Tensor:
    return torch.empty((), dtype=torch.float32, device=params[0].device if params else None)


_PENALTY_STEPS = ("gradient", "proximal")  # the config's penalty_step as a bool (proximal)


@custom_op(f"{NS}::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
              theta_star: list[Tensor], omega: list[Tensor], lam: float, lr: float, momentum: float,
              dampening: float, weight_decay: float, nesterov: bool, maximize: bool, init_buffers: bool,
              proximal: bool) -> Tensor:
    config = SGDConfig(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                       nesterov=nesterov, maximize=maximize, penalty_step=_PENALTY_STEPS[proximal])
    return optim.sgd_step_(params, grads, momentum_buffers, theta_star, omega, lam, config, init_buffers)


@sgd_step_.register_fake
def _(params, grads, momentum_buffers, theta_star, omega, lam, lr, momentum, dampening, weight_decay,
      nesterov, maximize, init_buffers, proximal):
    return _step_value_fake(params)


@custom_op(f"{NS}::adam_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adam_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               max_exp_avg_sqs: list[Tensor], steps: list[Tensor], theta_star: list[Tensor],
               omega: list[Tensor], lam: float, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               proximal: bool) -> Tensor:
    config = AdamConfig(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
                        penalty_step=_PENALTY_STEPS[proximal])
    return optim.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega,
                            lam, config)


@adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, lam, lr, beta1, beta2,
      eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, proximal):
    return _step_value_fake(params)


def _penalty_setup(ctx, inputs, output) -> None:
    params, theta_star, omega, lam = inputs
    ctx.save_for_backward(*params, *theta_star, *omega)
    ctx.n, ctx.lam = len(params), lam


def _penalty_backward(ctx, grad: Tensor):
    saved, n = ctx.saved_tensors, ctx.n
    grads = penalty_grad(list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:]), ctx.lam, grad)
    return grads, [None] * n, [None] * n, None


penalty.register_autograd(_penalty_backward, setup_context=_penalty_setup)
