"""Fused SGD / Adam(W) steps with the MAS penalty, as multi-tensor Triton kernels.

One launch per dtype (and, for Adam, per step count) covers many tensors, chunked like the
state ops of `multi_tensor.py`. Each program reads θ, g, the optimizer state, θ* and Ω once,
writes θ and the state, and leaves its chunk's Σ Ω(θ−θ*)² (fp64) for the returned penalty.
The arithmetic follows `reference.sgd_step_` / `adam_step_` in fp32: the penalty gradient
folded into g, or (PROXIMAL) the loss-only step θ' followed by θ* + (θ'−θ*) / (1 + 2·lr·λΩ).
Without θ* (a plain step) θ* and Ω rows hold placeholders the kernel never reads.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..optim_config import AdamConfig, SGDConfig
from ._runtime import CHUNK, CHUNK_BLOCK, INTERPRET
from .multi_tensor import _TL_DTYPE, _cast, _chunk, _Contiguous, _launches, _ptr

Tensor = torch.Tensor

# Address rows of a launch (θ*/Ω fp32 or lean, the rest in the parameters' dtype).
_THETA, _GRAD, _STAR, _OMEGA = 0, 1, 2, 3
_BUF = 4  # SGD: momentum buffer
_EXP_AVG, _EXP_AVG_SQ, _MAX_SQ = 4, 5, 6  # Adam


@triton.jit
def _load_step(addrs, n_tensors, index, offs, mask, P_DTYPE: tl.constexpr, TS_DTYPE: tl.constexpr,
               OM_DTYPE: tl.constexpr, PENALTY: tl.constexpr):
    """(θ, g, θ*, Ω, Σ-term) of the block in fp32 (θ*, Ω and the fp64 penalty term 0 without PENALTY);
    a lean θ* (θ's dtype) and Ω (bf16) widen on load."""
    theta = tl.load(_ptr(addrs, n_tensors, 0, index, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(_ptr(addrs, n_tensors, 1, index, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    star = tl.zeros_like(theta)
    omega = tl.zeros_like(theta)
    term = tl.zeros_like(theta).to(tl.float64)
    if PENALTY:
        star = tl.load(_ptr(addrs, n_tensors, 2, index, TS_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        omega = tl.load(_ptr(addrs, n_tensors, 3, index, OM_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        diff = theta.to(tl.float64) - star.to(tl.float64)
        term = omega.to(tl.float64) * diff * diff
    return theta, g, star, omega, term


@triton.jit
def _penalised(g, theta, star, omega, two_lam, PENALTY: tl.constexpr, PROXIMAL: tl.constexpr):
    """g + 2λΩ(θ−θ*) when the penalty is folded into the gradient, else g."""
    if PENALTY and not PROXIMAL:
        g = g + two_lam * omega * (theta - star)
    return g


@triton.jit
def _finish(stepped, star, omega, lr_two_lam, PENALTY: tl.constexpr, PROXIMAL: tl.constexpr):
    """θ* + (θ'−θ*) / (1 + 2·lr·λΩ) for the proximal step, else θ'."""
    if PENALTY and PROXIMAL:
        stepped = star + (stepped - star) / (1.0 + lr_two_lam * omega)
    return stepped


@triton.jit
def _sgd_kernel(addrs, numels, chunk_tensor, chunk_start, n_tensors, partial_ptr,
                two_lam, lr, lr_two_lam, momentum, keep, weight_decay,
                P_DTYPE: tl.constexpr, TS_DTYPE: tl.constexpr, OM_DTYPE: tl.constexpr, PENALTY: tl.constexpr,
                PROXIMAL: tl.constexpr, MOMENTUM: tl.constexpr,
                INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                WEIGHT_DECAY: tl.constexpr, INTERPRET: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows: θ, g, θ*, Ω, momentum buffer. torch.optim.SGD's foreach order (reference.sgd_step_)."""
    index, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    p = _ptr(addrs, n_tensors, 0, index, P_DTYPE)
    buf = _ptr(addrs, n_tensors, 4, index, P_DTYPE)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        mask = offs < end
        theta, g, star, omega, term = _load_step(addrs, n_tensors, index, offs, mask, P_DTYPE, TS_DTYPE,
                                                 OM_DTYPE, PENALTY)
        acc += term
        g = _penalised(g, theta, star, omega, two_lam, PENALTY, PROXIMAL)
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            g = g + weight_decay * theta
        if MOMENTUM:
            if INIT_BUFFERS:
                b = g
            else:
                b = tl.load(buf + offs, mask=mask, other=0.0).to(tl.float32) * momentum + keep * g
            tl.store(buf + offs, _cast(b, P_DTYPE, INTERPRET), mask=mask)
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        stepped = _finish(theta + (-lr) * g, star, omega, lr_two_lam, PENALTY, PROXIMAL)
        tl.store(p + offs, _cast(stepped, P_DTYPE, INTERPRET), mask=mask)
    if PENALTY:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _adam_kernel(addrs, numels, chunk_tensor, chunk_start, n_tensors, partial_ptr,
                 two_lam, lr_two_lam, w1, beta2, w2, eps, weight_decay, decay, neg_step, bc2_sqrt,
                 P_DTYPE: tl.constexpr, TS_DTYPE: tl.constexpr, OM_DTYPE: tl.constexpr, PENALTY: tl.constexpr,
                 PROXIMAL: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, L2: tl.constexpr, DECOUPLED: tl.constexpr, SMALL_W1: tl.constexpr,
                 INTERPRET: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows: θ, g, θ*, Ω, exp_avg, exp_avg_sq, max_exp_avg_sq. torch.optim.Adam(W)'s foreach
    order (reference.adam_step_); w1 = 1−β1, w2 = 1−β2, decay = 1 − lr·wd."""
    index, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    p = _ptr(addrs, n_tensors, 0, index, P_DTYPE)
    exp_avg = _ptr(addrs, n_tensors, 4, index, P_DTYPE)
    exp_avg_sq = _ptr(addrs, n_tensors, 5, index, P_DTYPE)
    max_sq = _ptr(addrs, n_tensors, 6, index, P_DTYPE)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        mask = offs < end
        theta, g, star, omega, term = _load_step(addrs, n_tensors, index, offs, mask, P_DTYPE, TS_DTYPE,
                                                 OM_DTYPE, PENALTY)
        acc += term
        g = _penalised(g, theta, star, omega, two_lam, PENALTY, PROXIMAL)
        if MAXIMIZE:
            g = -g
        if L2:
            g = g + weight_decay * theta
        if DECOUPLED:
            theta = theta * decay
        m_old = tl.load(exp_avg + offs, mask=mask, other=0.0).to(tl.float32)
        if SMALL_W1:  # torch.lerp's two formulas
            m = m_old + w1 * (g - m_old)
        else:
            m = g - (g - m_old) * (1.0 - w1)
        v = tl.load(exp_avg_sq + offs, mask=mask, other=0.0).to(tl.float32) * beta2 + w2 * g * g
        tl.store(exp_avg + offs, _cast(m, P_DTYPE, INTERPRET), mask=mask)
        tl.store(exp_avg_sq + offs, _cast(v, P_DTYPE, INTERPRET), mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(max_sq + offs, mask=mask, other=0.0).to(tl.float32), v)
            tl.store(max_sq + offs, _cast(v, P_DTYPE, INTERPRET), mask=mask)
        stepped = theta + neg_step * m / (tl.sqrt(v) / bc2_sqrt + eps)
        stepped = _finish(stepped, star, omega, lr_two_lam, PENALTY, PROXIMAL)
        tl.store(p + offs, _cast(stepped, P_DTYPE, INTERPRET), mask=mask)
    if PENALTY:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _run(kernel, rows: list[list[Tensor]], penalty: bool, lam: float, scalars: tuple, **flags) -> Tensor:
    """Launches `kernel` per dtype over `rows`; returns λ Σ Ω(θ−θ*)² in fp64 (0 without penalty)."""
    launches = _launches(rows)
    device = rows[0][0].device if rows[0] else None
    partial = torch.zeros(sum(l.n_chunks for l in launches), dtype=torch.float64, device=device)
    offset = 0
    for l in launches:
        kernel[(l.n_chunks,)](*l.args(), partial[offset:], *scalars, P_DTYPE=_TL_DTYPE[l.dtypes[0]],
                              TS_DTYPE=_TL_DTYPE[l.dtypes[_STAR]], OM_DTYPE=_TL_DTYPE[l.dtypes[_OMEGA]],
                              PENALTY=penalty, INTERPRET=INTERPRET, CHUNK=CHUNK, BLOCK=CHUNK_BLOCK, **flags)
        offset += l.n_chunks
    return partial.sum() * lam


def _terms(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor]) -> list[list[Tensor]]:
    """The θ* and Ω rows: the given lists, or placeholders (never read) for a plain step."""
    return [list(theta_star), list(omega)] if theta_star else [list(params), list(params)]


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: SGDConfig,
              init_buffers: bool) -> Tensor:
    """Fused SGD + MAS step in place (see reference.sgd_step_); returns the penalty before it."""
    c, penalty = config, bool(theta_star)
    bufs = list(momentum_buffers) if c.momentum != 0 else list(params)  # placeholder row without momentum
    work = _Contiguous([list(params), list(grads), *_terms(params, theta_star, omega), bufs],
                       mutated=(_THETA, _BUF) if c.momentum != 0 else (_THETA,))
    value = _run(_sgd_kernel, work.groups, penalty, lam,
                 (2.0 * lam, c.lr, c.lr * 2.0 * lam, c.momentum, 1.0 - c.dampening, c.weight_decay),
                 PROXIMAL=penalty and c.proximal, MOMENTUM=c.momentum != 0, INIT_BUFFERS=bool(init_buffers),
                 NESTEROV=c.nesterov, MAXIMIZE=c.maximize, WEIGHT_DECAY=c.weight_decay != 0)
    work.finish()
    return value.to(torch.float32)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
               theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: AdamConfig) -> Tensor:
    """Fused Adam(W) + MAS step in place (see reference.adam_step_); returns the penalty before it.
    Tensors are launched per step count (torch.optim's counters, incremented first)."""
    c, penalty = config, bool(theta_star)
    new_steps = [float(s.add_(1).item()) for s in steps]
    maxes = list(max_exp_avg_sqs) if c.amsgrad else list(params)  # placeholder row without amsgrad
    rows = [list(params), list(grads), *_terms(params, theta_star, omega), list(exp_avgs), list(exp_avg_sqs), maxes]
    mutated = (_THETA, _EXP_AVG, _EXP_AVG_SQ, _MAX_SQ) if c.amsgrad else (_THETA, _EXP_AVG, _EXP_AVG_SQ)
    values = []
    for step in sorted(set(new_steps)):
        members = [i for i, s in enumerate(new_steps) if s == step]
        work = _Contiguous([[row[i] for i in members] for row in rows], mutated=mutated)
        scalars = (2.0 * lam, c.lr * 2.0 * lam, 1.0 - c.beta1, c.beta2, 1.0 - c.beta2, c.eps, c.weight_decay,
                   1.0 - c.lr * c.weight_decay, -(c.lr / (1.0 - c.beta1 ** step)),
                   math.sqrt(1.0 - c.beta2 ** step))
        values.append(_run(_adam_kernel, work.groups, penalty, lam, scalars,
                           PROXIMAL=penalty and c.proximal, AMSGRAD=c.amsgrad, MAXIMIZE=c.maximize,
                           L2=c.weight_decay != 0 and not c.decoupled_weight_decay,
                           DECOUPLED=c.weight_decay != 0 and c.decoupled_weight_decay,
                           SMALL_W1=abs(1.0 - c.beta1) < 0.5))
        work.finish()
    return sum(values, torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)).to(
        torch.float32)
