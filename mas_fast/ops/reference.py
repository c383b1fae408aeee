"""Plain-PyTorch reference for every mas_fast op: the oracle every kernel is tested against.

Conventions shared by all backends:
- Importance results (Ω pieces) are float32, or float64 when the inputs are float64
  (`acc_dtype`); low-precision inputs are upcast before any arithmetic.
- Per-sample importance ops return Σ_k |g_k| over the samples k of one batch (a *batch
  sum*, not yet divided by the sample count) and never build a B×P tensor: they work in
  chunks of samples whose size bounds memory (`chunk_elements`).
- In-place ops end with `_` and return nothing (or the scalar named in their docstring).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .optim_config import AdamConfig, SGDConfig
from .policy import acc_dtype, penalty_dtype, samples_per_chunk, samples_per_weight_chunk

Tensor = torch.Tensor

# --------------------------------------------------------------------------- importance


def abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_n |δ_n| |x_n|ᵀ for delta (N, O), x (N, I) → (O, I).

    Exact per-sample importance of a Linear weight on 2-D input: g_n = δ_n x_nᵀ is rank
    one, so |g_n| = |δ_n| |x_n|ᵀ and the sum over samples is one GEMM of absolute values.
    """
    dt = acc_dtype(delta.dtype, x.dtype)
    return delta.to(dt).abs().t() @ x.to(dt).abs()


def per_sample_abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_k |Σ_t δ_kgt x_kgtᵀ| for delta (B, G, T, O), x (B, G, T, I) → (G, O, I).

    The per-sample reduction over t (sequence positions, conv output pixels) happens
    before the absolute value; samples are processed in chunks of a few
    (`samples_per_weight_chunk`) so that memory stays O(c·G·O·I), never O(B·G·O·I). With one
    position (T = 1) each sample's product is rank one, |δ xᵀ| = |δ||x|ᵀ: one GEMM of absolute
    values per group.
    """
    B, G, T, O = delta.shape
    I = x.shape[-1]
    dt = acc_dtype(delta.dtype, x.dtype)
    if T == 1:
        return delta[:, :, 0].to(dt).abs().permute(1, 2, 0) @ x[:, :, 0].to(dt).abs().transpose(0, 1)
    out = torch.zeros(G, O, I, dtype=dt, device=delta.device)
    step = samples_per_weight_chunk(G * O * I, B)
    for s in range(0, B, step):
        d = delta[s:s + step].to(dt)
        xx = x[s:s + step].to(dt)
        out += (d.transpose(-1, -2) @ xx).abs_().sum(0)  # in place: one chunk-sized temporary
    return out


def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Σ_k |Σ_t δ_ktc · s_ktc| for delta (B, T, C) (and scale of the same shape) → (C,).

    Bias (scale None) and norm-affine weights (scale = normalised input x̂).
    """
    dt = acc_dtype(delta.dtype, *(() if scale is None else (scale.dtype,)))
    d = delta.to(dt)
    if scale is not None:
        d = d * scale.to(dt)
    return d.sum(1).abs().sum(0)


def conv_abs_grad(
    delta: Tensor,
    x: Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Σ_k |∂/∂W of <δ_k, conv(x_k, W)>| for a 2-D convolution, shaped like the weight.

    delta (B, Cout, Ho, Wo), x (B, Cin, H, W) (already padded for non-zero padding
    modes); `padding` is the symmetric zero padding the convolution applied. The
    per-sample gradient is Δ_k U_kᵀ with U_k the unfolded input, reduced over output
    pixels per sample and group before the absolute value, in chunks of samples.
    """
    B, Cout = delta.shape[:2]
    kh, kw = weight_shape[-2:]
    G = groups
    cin_g = x.shape[1] // G
    L = delta.shape[2] * delta.shape[3]
    dt = acc_dtype(delta.dtype, x.dtype)
    if cin_g == 1:
        return _depthwise_abs_grad(delta, x.to(dt), (kh, kw), stride, padding, dilation, G).view(weight_shape)
    out = torch.zeros(G, Cout // G, cin_g * kh * kw, dtype=dt, device=delta.device)
    step = samples_per_chunk(x.shape[1] * kh * kw * L, B)  # per_sample_abs_matmul bounds its own
    for s in range(0, B, step):
        xs = x[s:s + step].to(dt)
        c = xs.shape[0]
        u = F.unfold(xs, (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                     stride=tuple(stride))  # (c, Cin*kh*kw, L)
        u = u.view(c, G, cin_g * kh * kw, L).transpose(-1, -2)  # (c, G, L, I)
        d = delta[s:s + step].to(dt).reshape(c, G, Cout // G, L).transpose(-1, -2)  # (c, G, L, O)
        out += per_sample_abs_matmul(d, u)
    return out.reshape(weight_shape)


def _window(out_pos: int, size: int, kernel: int, stride: int, dilation: int, pad: int) -> tuple[slice, slice]:
    """(kernel taps, input positions) that output position `out_pos` of a zero-padded
    convolution reads inside the input, along one axis (empty slices when none)."""
    first = out_pos * stride - pad
    lo = -(first // dilation) if first < 0 else 0  # ⌈-first / dilation⌉ taps fall in the padding
    hi = min(kernel - 1, (size - 1 - first) // dilation)
    if hi < lo:
        return slice(0, 0), slice(0, 0)
    start = first + lo * dilation
    return slice(lo, hi + 1), slice(start, start + (hi - lo) * dilation + 1, dilation)


def _depthwise_abs_grad(delta: Tensor, x: Tensor, kernel: tuple[int, int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """conv_abs_grad (→ (Cout, kh, kw)) of a convolution with one input channel per group (depthwise).

    Its per-sample gradients (B, Cout, kh, kw) are smaller than its unfolded input (kh·kw
    times the input), so they are computed directly, in chunks of samples: with few output
    pixels (Ho·Wo ≤ kh·kw) as Σ over pixels of δ times the part of x the pixel saw; else as
    one convolution of each sample's input channel with its δ as the kernel (stride and
    dilation swap roles), cropped to the kernel's size. The padding is never materialised.
    """
    B, Cout, Ho, Wo = delta.shape
    kh, kw = kernel
    H, W = x.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    d_all = delta.to(x.dtype)
    out = torch.zeros(Cout, kh, kw, dtype=x.dtype, device=x.device)
    step = samples_per_chunk(Cout * (kh * kw + H * W), B)
    for s in range(0, B, step):
        xs, d = x[s:s + step], d_all[s:s + step]
        xs = xs.repeat_interleave(Cout // groups, 1) if Cout != groups else xs  # output channel → its input
        c = xs.shape[0]
        if Ho * Wo <= kh * kw:
            g = torch.zeros(c, Cout, kh, kw, dtype=x.dtype, device=x.device)
            for p in range(Ho):
                taps_h, rows = _window(p, H, kh, sh, dh, ph)
                for q in range(Wo):
                    taps_w, cols = _window(q, W, kw, sw, dw, pw)
                    g[:, :, taps_h, taps_w].addcmul_(xs[:, :, rows, cols], d[:, :, p:p + 1, q:q + 1])
        else:
            g = F.conv2d(xs.reshape(1, c * Cout, H, W), d.reshape(c * Cout, 1, Ho, Wo), stride=(dh, dw),
                         padding=(ph, pw), dilation=(sh, sw), groups=c * Cout)[0, :, :kh, :kw]
            g = g.reshape(c, Cout, kh, kw)
        out += g.abs_().sum(0)
    return out


def embedding_abs_grad(
    indices: Tensor, delta: Tensor, num_embeddings: int, padding_idx: Optional[int] = None
) -> Tensor:
    """Σ_k |Σ_{t: idx_kt = v} δ_kt| per row v, for indices (B, L), delta (B, L, D) → (V, D).

    Per-sample scatter without a B×V×D tensor: positions are grouped by the key
    (sample, row), summed, made absolute and added into their row.
    """
    B, L = indices.shape
    D = delta.shape[-1]
    dt = acc_dtype(delta.dtype)
    idx = indices.reshape(B, L).long()
    d = delta.reshape(B * L, D).to(dt)
    keep = torch.ones(B * L, dtype=torch.bool, device=idx.device)
    if padding_idx is not None:
        keep = idx.reshape(-1) != (padding_idx % num_embeddings)
    sample = torch.arange(B, device=idx.device).repeat_interleave(L)
    keys = (sample * num_embeddings + idx.reshape(-1))[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    per_key = torch.zeros(uniq.numel(), D, dtype=dt, device=d.device).index_add_(0, inverse, d[keep])
    out = torch.zeros(num_embeddings, D, dtype=dt, device=d.device)
    return out.index_add_(0, uniq % num_embeddings, per_key.abs())


# --------------------------------------------------------------------------- state updates


def running_mean_update_(
    means: Sequence[Tensor],
    compensations: Sequence[Tensor],
    batch_sums: Sequence[Tensor],
    count: int,
    batch_count: int,
) -> None:
    """Fold a batch sum S (over `batch_count` samples) into a running mean of `count` samples.

    mean ← mean + (S − n_b·mean)/(N + n_b), added with Kahan compensation (`compensations` holds
    the lost low-order bits), so that streaming 10⁷ samples stays at float32 round-off
    instead of drifting with the number of updates.
    """
    total = count + batch_count
    for m, c, s in zip(means, compensations, batch_sums):
        delta = (s.to(m.dtype) - batch_count * m) / total
        y = delta - c
        t = m + y
        c.copy_((t - m) - y)
        m.copy_(t)


def merge_(dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
    """dst ← a·dst + b·src, per tensor: Ω merge across tasks (sum: a=b=1; alpha: a=α, b=1−α)."""
    for d, s in zip(dst, src):
        d.mul_(a).add_(s.to(d.dtype), alpha=b)


# --------------------------------------------------------------------------- penalty


def penalty(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
            lam: float) -> Tensor:
    """λ Σ_i Ω_i (θ_i − θ*_i)², differentiable w.r.t. `params`, returned in `penalty_dtype`.

    θ* is in the parameter's accumulation dtype or (lean state) its own; Ω in the accumulation
    dtype or bfloat16. Every term and the sum are computed in float64: Ω near the float32 limit
    times (θ − θ*)² can overflow float32 although λ·Σ fits, so the result is inf only when it
    truly exceeds the float32 range.
    """
    if len(params) == 0:
        return torch.zeros((), dtype=torch.float32)
    terms = [(o.double() * (p.double() - t.double()).square()).sum() for p, t, o in zip(params, theta_star, omega)]
    return (lam * torch.stack(terms).sum()).to(penalty_dtype(theta_star, omega))


def penalty_grad(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
                 lam: float) -> list[Tensor]:
    """2λΩ(θ − θ*) per tensor, in the parameter's dtype: the gradient of `penalty`
    (computed in float64, so that a huge Ω with a small λ does not overflow on the way)."""
    return [(2.0 * lam * o.double() * (p.detach().double() - t.double())).to(p.dtype)
            for p, t, o in zip(params, theta_star, omega)]


def penalty_and_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                      omega: Sequence[Tensor], lam: float) -> Tensor:
    """grad += 2λΩ(θ − θ*) in place; returns the penalty λ Σ Ω (θ − θ*)² (detached)."""
    with torch.no_grad():
        value = penalty(params, theta_star, omega, lam)
        for g, pg in zip(grads, penalty_grad(params, theta_star, omega, lam)):
            g.add_(pg)
    return value


# --------------------------------------------------------------------------- fused optimizer steps
# One step of torch.optim's SGD / Adam(W) with the MAS penalty λΣΩ(θ−θ*)², where θ*/Ω are
# given (one per parameter; empty lists: a plain step). config.penalty_step says how:
# "gradient": the step on g + 2λΩ(θ−θ*) (torch.optim on loss + penalty); "proximal": the step
# on g alone gives θ', then θ ← θ* + (θ' − θ*) / (1 + 2·lr·λΩ) (see optim_config). The
# arithmetic runs in the accumulation dtype (fp32 for bf16/fp16 parameters, rounded once when
# stored) in torch.optim's foreach order of operations. Both return λΣΩ(θ−θ*)² at the
# parameters before the step (0 without θ*).


def _penalised_grads(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                     omega: Sequence[Tensor], lam: float,
                     fold: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(penalty value, θ, g, θ*, Ω, all upcast to the accumulation dtype) for the step functions
    below; `fold` adds the penalty gradient 2λΩ(θ−θ*) to g."""
    pvs = [p.detach().to(acc_dtype(p.dtype)) for p in params]
    gs = [g.to(pv.dtype) for g, pv in zip(grads, pvs)]
    if not theta_star:
        return torch.zeros((), dtype=torch.float32), pvs, gs, [], []
    stars = [t.to(pv.dtype) for t, pv in zip(theta_star, pvs)]  # lean θ*/Ω: widened first
    omegas = [o.to(pv.dtype) for o, pv in zip(omega, pvs)]
    value = penalty(pvs, theta_star, omega, lam)
    if fold:
        gs = [g + (2.0 * lam) * o * (pv - t) for g, pv, t, o in zip(gs, pvs, stars, omegas)]
    return value, pvs, gs, stars, omegas


def _proximal(stepped: Tensor, theta_star: Tensor, omega: Tensor, lr_two_lam: float) -> Tensor:
    """θ* + (θ' − θ*) / (1 + 2·lr·λΩ): the penalty's proximal map at the loss-only step θ'.
    Written around θ* so that an infinite 2·lr·λΩ gives θ* (not inf/inf); in place on its two
    temporaries, so that it allocates less than folding 2λΩ(θ−θ*) into g (fresh large buffers
    cost page faults)."""
    return (stepped - theta_star).div_((omega * lr_two_lam).add_(1.0)).add_(theta_star)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
              theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: SGDConfig,
              init_buffers: bool) -> Tensor:
    """torch.optim.SGD step with the MAS penalty (folded into g, or proximal), in place on params
    and buffers (see mas_fast.ops.sgd_step_); with prox the buffer holds the loss direction only."""
    lr, momentum, dampening = config.lr, config.momentum, config.dampening
    weight_decay, nesterov, maximize = config.weight_decay, config.nesterov, config.maximize
    prox = config.proximal and bool(theta_star)
    with torch.no_grad():
        value, pvs, gs, stars, omegas = _penalised_grads(params, grads, theta_star, omega, lam, fold=not prox)
        for i, (p, pv, g) in enumerate(zip(params, pvs, gs)):
            if maximize:
                g = -g
            if weight_decay != 0:
                g = g + weight_decay * pv
            if momentum != 0:  # with prox, the buffer holds the loss direction only
                buf = momentum_buffers[i]
                b = g if init_buffers else buf.to(g.dtype) * momentum + (1.0 - dampening) * g
                buf.copy_(b)
                g = g + momentum * b if nesterov else b
            stepped = pv + (-lr) * g
            p.copy_(_proximal(stepped, stars[i], omegas[i], lr * 2.0 * lam) if prox else stepped)
    return value


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
               theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float, config: AdamConfig) -> Tensor:
    """torch.optim.Adam (AdamW: decoupled_weight_decay) step with the MAS penalty (folded into g,
    or proximal after the update), in place on params and the state (see mas_fast.ops.adam_step_)."""
    lr, beta1, beta2, eps = config.lr, config.beta1, config.beta2, config.eps
    weight_decay, decoupled_weight_decay = config.weight_decay, config.decoupled_weight_decay
    amsgrad, maximize = config.amsgrad, config.maximize
    prox = config.proximal and bool(theta_star)
    with torch.no_grad():
        value, pvs, gs, stars, omegas = _penalised_grads(params, grads, theta_star, omega, lam, fold=not prox)
        for i, (p, pv, g) in enumerate(zip(params, pvs, gs)):
            if maximize:
                g = -g
            if weight_decay != 0 and not decoupled_weight_decay:
                g = g + weight_decay * pv
            if weight_decay != 0 and decoupled_weight_decay:
                pv = pv * (1.0 - lr * weight_decay)
            steps[i].add_(1)
            step = steps[i].item()
            step_size = lr / (1.0 - beta1 ** step)
            bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
            m = torch.lerp(exp_avgs[i].to(g.dtype), g, 1.0 - beta1)
            v = exp_avg_sqs[i].to(g.dtype) * beta2 + (1.0 - beta2) * g * g
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            if amsgrad:
                v = torch.maximum(max_exp_avg_sqs[i].to(g.dtype), v)
                max_exp_avg_sqs[i].copy_(v)
            stepped = pv + (-step_size) * m / (v.sqrt() / bc2_sqrt + eps)
            p.copy_(_proximal(stepped, stars[i], omegas[i], lr * 2.0 * lam) if prox else stepped)
    return value


__all__ = [
    "abs_matmul", "per_sample_abs_matmul", "per_sample_abs_sum", "conv_abs_grad",
    "embedding_abs_grad", "running_mean_update_", "merge_", "penalty", "penalty_grad",
    "penalty_and_grad_", "sgd_step_", "adam_step_",
]
