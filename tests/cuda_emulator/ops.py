"""The emulated CUDA kernels behind mas_fast.ops.reference's signatures, for the property
tests' op cases: what csrc/cuda/register.cpp does around the raw entry points —
contiguous copies written back to strided targets, one launch group per (dtype, Adam step),
and the penalty's autograd backward through the penalty_grad kernel."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from . import EmulatedCuda

Tensor = torch.Tensor


def _contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def _write_back(targets: Sequence[Tensor], copies: Sequence[Tensor]) -> None:
    for target, copy in zip(targets, copies):
        if copy.data_ptr() != target.data_ptr():
            target.copy_(copy)


def _one_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"one dtype per emulated launch, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _value(value: Tensor, omega: Sequence[Tensor]) -> Tensor:
    """The kernels' float64 penalty in Ω's dtype, float32 without Ω (as register.cpp's sum_values)."""
    return value.to(omega[0].dtype if omega else torch.float32)


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emu: EmulatedCuda, lam: float, stars, omegas, *params):
        ctx.emu, ctx.lam, ctx.stars, ctx.omegas = emu, lam, stars, omegas
        ctx.save_for_backward(*params)
        return _value(emu.penalty(_contiguous(params), _contiguous(stars), _contiguous(omegas), lam), omegas)

    @staticmethod
    def backward(ctx, upstream):
        grads = ctx.emu.penalty_grad(_contiguous(ctx.saved_tensors), _contiguous(ctx.stars),
                                     _contiguous(ctx.omegas), ctx.lam, upstream=upstream.item())
        return (None, None, None, None, *grads)


class EmulatedOps:
    """mas_fast.ops.reference's op functions, run by the emulated CUDA kernels."""

    def __init__(self, emu: EmulatedCuda):
        self.emu = emu

    def penalty(self, params, theta_star, omega, lam: float) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        _one_dtype(params)
        return _Penalty.apply(self.emu, lam, list(theta_star), list(omega), *params)

    def penalty_and_grad_(self, params, grads, theta_star, omega, lam: float) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        _one_dtype(params)
        g = _contiguous(grads)
        value = self.emu.penalty_and_grad_(_contiguous(params), g, _contiguous(theta_star), _contiguous(omega), lam)
        _write_back(grads, g)
        return _value(value, omega)

    def merge_(self, dst, src, a: float, b: float) -> None:
        if dst:
            d = _contiguous(dst)
            self.emu.merge_(d, _contiguous(src), a, b)
            _write_back(dst, d)

    def running_mean_update_(self, means, comps, batch_sums, count: int, batch_count: int) -> None:
        if means:
            m, c = _contiguous(means), _contiguous(comps)
            self.emu.running_mean_update_(m, c, _contiguous(batch_sums), count, batch_count)
            _write_back(means, m)
            _write_back(comps, c)

    @staticmethod
    def _terms(params, theta_star, omega) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """θ*/Ω for the kernel: empty lists (a plain step) become nullptr entries."""
        if not theta_star:
            return [None] * len(params), [None] * len(params)
        return _contiguous(theta_star), _contiguous(omega)

    def sgd_step_(self, params, grads, momentum_buffers, theta_star, omega, **hyper) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        _one_dtype(params)
        p, bufs = _contiguous(params), _contiguous(momentum_buffers)
        value = self.emu.sgd_step_(p, _contiguous(grads), bufs, *self._terms(params, theta_star, omega), **hyper)
        _write_back(params, p)
        _write_back(momentum_buffers, bufs)
        return _value(value, omega)

    def adam_step_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, *,
                   amsgrad: bool, **hyper) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        _one_dtype(params)
        for s in steps:
            s.add_(1)
        groups = defaultdict(list)  # the kernel takes one step count per launch
        for i, s in enumerate(steps):
            groups[s.item()].append(i)
        stars, omegas = self._terms(params, theta_star, omega)
        total = torch.zeros((), dtype=torch.float64)
        for step, index in groups.items():
            pick = lambda ts: [ts[i] for i in index]  # noqa: E731
            lists = [pick(params), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else []]
            copies = [_contiguous(ts) for ts in lists]
            total += self.emu.adam_step_(copies[0], _contiguous(pick(grads)), *copies[1:], pick(stars), pick(omegas),
                                         step=step, amsgrad=amsgrad, **hyper)
            for targets, c in zip(lists, copies):
                _write_back(targets, c)
        return _value(total, omega)

    def per_sample_abs_sum(self, delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        B, T, C = delta.shape
        if B == 0 or T == 0 or C == 0:  # as ops.cpp: no launch
            return torch.zeros(C, dtype=torch.float32)
        return self.emu.per_sample_abs_sum(delta, scale)
