"""Hypothesis strategies for every op's inputs, and brute-force float64 oracles.

Each `OpCase` says how to draw an op's arguments (random shapes including 0-size,
1-element, odd and very long ones; dtypes; non-contiguous, transposed and broadcast
views; λ/α values), how to run an implementation on fresh copies of those arguments
(in-place targets keep their strides), and what the op must return, written the naive
way: per-sample tensors, one-hot scatters, autograd per sample, all in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.func import grad, vmap

from mas_fast.ops import AdamConfig, SGDConfig
from mas_fast.ops.policy import acc_dtype, penalty_dtype, state_dtypes_allowed
from tolerances import assert_close

Tensor = torch.Tensor
D64 = torch.float64
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_FLOATS = (torch.float32, torch.float64, *LOW_PRECISION)
ACC_FLOATS = (torch.float32, torch.float64)  # the dtypes Ω, θ* (default state) and running means are kept in


@dataclass(frozen=True)
class Limits:
    """Shape budget: `dim` bounds ordinary dimensions, `long` lists long-axis lengths."""

    dim: int
    long: tuple[int, ...]


NATIVE = Limits(dim=9, long=(257, 4099))
EMULATED = Limits(dim=5, long=(67,))  # the Triton interpreter is slow: small shapes only


# --------------------------------------------------------------------------- tensors


def _layout(t: Tensor, layout: str) -> Tensor:
    """The same values as `t`, stored with the requested memory layout."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if layout == "broadcast" and t.dim() >= 1:
        return t[:1].expand(t.shape)
    return t


@st.composite
def tensors(draw, shape: Sequence[int], dtype: torch.dtype, device: str, *, kind: str = "normal",
            scale: float = 1.0, writable: bool = False) -> Tensor:
    """A tensor of `shape` with seeded random values, in a drawn memory layout.

    kind "normal": N(0, scale²); "positive": U[0, scale). Writable tensors (in-place
    targets) are never broadcast views.
    """
    layouts = ["contiguous", "transposed", "strided"] + ([] if writable else ["broadcast"])
    layout = draw(st.sampled_from(layouts))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = (torch.randn if kind == "normal" else torch.rand)(tuple(shape), generator=g, dtype=D64)
    return _layout((values * scale).to(dtype=dtype, device=device), layout)


def fresh(t: Tensor) -> Tensor:
    """A private copy with the same strides, so in-place ops see the same layout."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def small(lim: Limits) -> st.SearchStrategy[int]:
    return st.integers(1, lim.dim)


def length(lim: Limits, low: int = 0) -> st.SearchStrategy[int]:
    """A sample/position count: 0 (unless low > 0), 1, small odd ones, or one of the long lengths."""
    return st.one_of(st.integers(low, lim.dim), st.sampled_from(lim.long))


def shapes(lim: Limits) -> st.SearchStrategy[tuple[int, ...]]:
    """Parameter-like shapes: scalar to 3-D, 0-size and 1-element included, or one long vector."""
    return st.one_of(st.lists(st.integers(0, lim.dim), max_size=3).map(tuple),
                     st.sampled_from(lim.long).map(lambda n: (n,)))


# --------------------------------------------------------------------------- op cases

Expected = list[tuple[Tensor, torch.dtype]]  # (float64 value, the dtype the op must return)


@dataclass(frozen=True)
class OpCase:
    """How to draw, run and check one op (see the module docstring)."""

    inputs: Callable[[str, Limits], st.SearchStrategy[tuple]]
    run: Callable[[Callable, tuple], list[Tensor]]
    brute_force: Callable[[tuple], Expected]


def _d(t: Tensor) -> Tensor:
    return t.detach().to(D64)


# abs_matmul(delta (N, O), x (N, I)) -> (O, I)

@st.composite
def _abs_matmul_inputs(draw, device, lim):
    n, o, i = draw(length(lim)), draw(small(lim)), draw(small(lim))
    dt = draw(st.sampled_from(ALL_FLOATS))
    return draw(tensors((n, o), dt, device)), draw(tensors((n, i), dt, device))


def _abs_matmul_brute(args) -> Expected:
    d, x = args
    return [((_d(d)[:, :, None] * _d(x)[:, None, :]).abs().sum(0), acc_dtype(d.dtype, x.dtype))]


# per_sample_abs_matmul(delta (B, G, T, O), x (B, G, T, I)) -> (G, O, I)

@st.composite
def _psam_inputs(draw, device, lim):
    b, g, o, i = draw(st.integers(0, lim.dim)), draw(st.integers(1, 3)), draw(small(lim)), draw(small(lim))
    t = draw(length(lim, low=1))
    dt = draw(st.sampled_from(ALL_FLOATS))
    return draw(tensors((b, g, t, o), dt, device)), draw(tensors((b, g, t, i), dt, device))


def _psam_brute(args) -> Expected:
    d, x = args
    return [(torch.einsum("bgto,bgti->bgoi", _d(d), _d(x)).abs().sum(0), acc_dtype(d.dtype, x.dtype))]


# per_sample_abs_sum(delta (B, T, C), scale (B, T, C) | None) -> (C,)

@st.composite
def _psas_inputs(draw, device, lim):
    b, t, c = draw(st.integers(0, lim.dim)), draw(small(lim)), draw(length(lim, low=1))
    dt = draw(st.sampled_from(ALL_FLOATS))
    scale = draw(st.none() | tensors((b, t, c), dt, device))
    return draw(tensors((b, t, c), dt, device)), scale


def _psas_brute(args) -> Expected:
    d, s = args
    weighted = _d(d) if s is None else _d(d) * _d(s)
    dtypes = (d.dtype,) if s is None else (d.dtype, s.dtype)
    return [(weighted.sum(1).abs().sum(0), acc_dtype(*dtypes))]


# conv_abs_grad(delta (B, Cout, Ho, Wo), x (B, Cin, H, W), weight_shape, stride, padding, dilation, groups)

@st.composite
def _conv_inputs(draw, device, lim):
    groups, cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = [max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, lim.dim))
            for k, p, d in zip(kernel, padding, dilation)]
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, p, d, s in zip(size, kernel, padding, dilation, stride)]
    b, dt = draw(st.integers(0, 4)), draw(st.sampled_from(ALL_FLOATS))
    x = draw(tensors((b, cin_g * groups, *size), dt, device))
    delta = draw(tensors((b, cout_g * groups, *out), dt, device))
    return delta, x, (cout_g * groups, cin_g, *kernel), stride, padding, dilation, groups


def _conv_brute(args) -> Expected:
    delta, x, weight_shape, stride, padding, dilation, groups = args
    w = torch.zeros(weight_shape, dtype=D64, device=x.device)

    def contribution(w, xk, dk):  # <δ_k, conv(x_k, W)>: its gradient is sample k's weight gradient
        return (F.conv2d(xk[None], w, None, stride, padding, dilation, groups) * dk[None]).sum()

    total = w.clone() if x.shape[0] == 0 else \
        vmap(grad(contribution), in_dims=(None, 0, 0))(w, _d(x), _d(delta)).abs().sum(0)
    return [(total, acc_dtype(delta.dtype, x.dtype))]


# embedding_abs_grad(indices (B, L), delta (B, L, D), num_embeddings, padding_idx)

@st.composite
def _embedding_inputs(draw, device, lim):
    vocab, b, dim = draw(small(lim)), draw(st.integers(0, lim.dim)), draw(small(lim))
    positions = draw(length(lim))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    idx = torch.randint(0, vocab, (b, positions), generator=g).to(dtype=index_dtype, device=device)
    idx = _layout(idx, draw(st.sampled_from(["contiguous", "transposed"])))
    padding_idx = draw(st.none() | st.integers(-vocab, vocab - 1))
    delta = draw(tensors((b, positions, dim), draw(st.sampled_from(ALL_FLOATS)), device))
    return idx, delta, vocab, padding_idx


def _embedding_brute(args) -> Expected:
    idx, delta, vocab, padding_idx = args
    hot = F.one_hot(idx.long(), vocab).to(D64)  # (B, L, V)
    if padding_idx is not None:
        hot[..., padding_idx % vocab] = 0
    return [(torch.einsum("blv,bld->bvd", hot, _d(delta)).abs().sum(0), acc_dtype(delta.dtype))]


# running_mean_update_(means, comps, batch_sums, count, batch_count): in place

@st.composite
def _running_mean_inputs(draw, device, lim):
    dt = draw(st.sampled_from(ACC_FLOATS))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    count, batch_count = draw(st.integers(0, 10**7)), draw(st.integers(1, 10**4))
    means, comps, sums = [], [], []
    for shape in draw(st.lists(shapes(lim), max_size=4)):
        means.append(draw(tensors(shape, dt, device, kind="positive", scale=scale, writable=True)))
        ulp = torch.finfo(dt).eps * scale  # a plausible Kahan residue: round-off sized
        comps.append(draw(tensors(shape, dt, device, scale=ulp, writable=True)))
        sums.append(draw(tensors(shape, dt, device, kind="positive", scale=scale * batch_count)))
    return means, comps, sums, count, batch_count


def _running_mean_run(fn, args) -> list[Tensor]:
    means, comps, sums, count, batch_count = args
    new_means, new_comps = [fresh(m) for m in means], [fresh(c) for c in comps]
    fn(new_means, new_comps, sums, count, batch_count)
    for old, new, comp in zip(means, new_means, new_comps):
        # comp holds the low-order bits the last addition lost: at most ~1 ulp of the operands.
        # (Its use across many updates is what tests/test_numerics.py measures.)
        bound = 2 * torch.finfo(old.dtype).eps * (old.to(D64).abs() + new.to(D64).abs())
        assert (comp.to(D64).abs() <= bound + torch.finfo(old.dtype).tiny).all(), "Kahan residue too large"
    return new_means


def _running_mean_brute(args) -> Expected:
    means, comps, sums, count, batch_count = args
    return [(_d(m) - _d(c) + (_d(s) - batch_count * _d(m)) / (count + batch_count), m.dtype)
            for m, c, s in zip(means, comps, sums)]


# merge_(dst, src, a, b): dst ← a·dst + b·src in place

@st.composite
def _merge_inputs(draw, device, lim):
    dt = draw(st.sampled_from(ACC_FLOATS))
    alpha = draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1))
    a, b = draw(st.sampled_from([(1.0, 1.0), (alpha, 1.0 - alpha)]))
    pairs = [(draw(tensors(s, dt, device, kind="positive", writable=True)),
              draw(tensors(s, dt, device, kind="positive"))) for s in draw(st.lists(shapes(lim), max_size=4))]
    return [d for d, _ in pairs], [s for _, s in pairs], a, b


def _merge_run(fn, args) -> list[Tensor]:
    dst, src, a, b = args
    dst = [fresh(d) for d in dst]
    fn(dst, src, a, b)
    return dst


def _merge_brute(args) -> Expected:
    dst, src, a, b = args
    return [(a * _d(d) + b * _d(s), d.dtype) for d, s in zip(dst, src)]


# penalty(params, theta_star, omega, lam) and penalty_and_grad_(params, grads, theta_star, omega, lam)

@st.composite
def state_dtypes(draw, param_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(θ*, Ω) dtypes for parameters of `param_dtype`: the accumulation dtype (default state) or
    the lean one (θ* in the parameter's dtype, Ω in bfloat16), each drawn on its own."""
    star_dtypes, omega_dtypes = state_dtypes_allowed(param_dtype)
    return draw(st.sampled_from(star_dtypes)), draw(st.sampled_from(omega_dtypes))


@st.composite
def _penalty_inputs(draw, device, lim, with_grads: bool = False):
    dt = draw(st.sampled_from(ALL_FLOATS))
    star_dt, omega_dt = draw(state_dtypes(dt))
    lam = draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 100))
    params, grads, stars, omegas = [], [], [], []
    for shape in draw(st.lists(shapes(lim), max_size=4)):
        p = draw(tensors(shape, dt, device, writable=True))  # parameters are never broadcast views
        params.append(p)
        grads.append(draw(tensors(shape, dt, device, writable=True)))
        stars.append(_layout((p.to(D64) + draw(tensors(shape, D64, device, scale=0.1))).to(star_dt),
                             draw(st.sampled_from(["contiguous", "transposed", "strided"]))))
        omegas.append(draw(tensors(shape, omega_dt, device, kind="positive")))
    return (params, grads, stars, omegas, lam) if with_grads else (params, stars, omegas, lam)


def _penalty_run(fn, args) -> list[Tensor]:
    params, stars, omegas, lam = args
    leaves = [fresh(p).requires_grad_() for p in params]
    value = fn(leaves, stars, omegas, lam)
    grads = torch.autograd.grad(value, leaves) if value.requires_grad else ()
    return [value.detach(), *grads]


def _penalty_grads(params, stars, omegas, lam) -> Expected:
    return [(2 * lam * _d(o) * (_d(p) - _d(t)), p.dtype) for p, t, o in zip(params, stars, omegas)]


def _penalty_value(params, stars, omegas, lam) -> tuple[Tensor, torch.dtype]:
    value = lam * sum(((_d(o) * (_d(p) - _d(t)) ** 2).sum() for p, t, o in zip(params, stars, omegas)),
                      torch.zeros((), dtype=D64))
    return value, penalty_dtype(stars, omegas)


def _penalty_brute(args) -> Expected:
    return [_penalty_value(*args), *_penalty_grads(*args)]


def _penalty_and_grad_run(fn, args) -> list[Tensor]:
    params, grads, stars, omegas, lam = args
    grads = [fresh(g) for g in grads]
    value = fn(params, grads, stars, omegas, lam)
    return [value, *grads]


def _penalty_and_grad_brute(args) -> Expected:
    params, grads, stars, omegas, lam = args
    steps = _penalty_grads(params, stars, omegas, lam)
    return [_penalty_value(params, stars, omegas, lam),
            *((_d(g) + step, dt) for g, (step, dt) in zip(grads, steps))]


# sgd_step_ / adam_step_: one torch.optim step on g + 2λΩ(θ−θ*) ("gradient"), or on g alone then
# the closed-form proximal update (θ' + 2ηλΩθ*) / (1 + 2ηλΩ) ("proximal"); in place; returns the
# penalty before the step

@st.composite
def _step_tensors(draw, device, lim):
    """Parameters, their grads and (θ*, Ω) — or empty θ*/Ω lists: a plain step."""
    dt = draw(st.sampled_from(ALL_FLOATS))
    shapes_ = draw(st.lists(shapes(lim), max_size=3))
    params = [draw(tensors(s, dt, device, writable=True)) for s in shapes_]
    grads = [draw(tensors(s, dt, device)) for s in shapes_]
    covered = draw(st.booleans())
    star_dt, omega_dt = draw(state_dtypes(dt))
    stars = [(p.to(D64) + draw(tensors(p.shape, D64, device, scale=0.1))).to(star_dt) for p in params] \
        if covered else []
    omegas = [draw(tensors(p.shape, omega_dt, device, kind="positive")) for p in params] if covered else []
    return params, grads, stars, omegas


def _lams():
    return st.sampled_from([0.0, 1.0]) | st.floats(0, 100)


def _penalty_steps():
    return st.sampled_from(["gradient", "proximal"])


@st.composite
def _sgd_inputs(draw, device, lim):
    params, grads, stars, omegas = draw(_step_tensors(device, lim))
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0, 0.99))
    dampening = draw(st.sampled_from([0.0]) | st.floats(0, 0.9))
    config = SGDConfig(lr=draw(st.floats(1e-4, 1.0)), momentum=momentum, dampening=dampening,
                       weight_decay=draw(st.sampled_from([0.0]) | st.floats(0, 0.1)),
                       nesterov=momentum > 0 and dampening == 0 and draw(st.booleans()),
                       maximize=draw(st.booleans()), penalty_step=draw(_penalty_steps()))
    hyper = dict(lam=draw(_lams()), config=config, init_buffers=momentum > 0 and draw(st.booleans()))
    bufs = [draw(tensors(p.shape, p.dtype, device, writable=True)) for p in params] if momentum else []
    return params, grads, bufs, stars, omegas, hyper


def _sgd_run(fn, args) -> list[Tensor]:
    params, grads, bufs, stars, omegas, hyper = args
    params, bufs = [fresh(p) for p in params], [fresh(b) for b in bufs]
    value = fn(params, grads, bufs, stars, omegas, **hyper)
    return [value, *params, *bufs]


def _optim_oracle(params, grads, stars, omegas, lam, make_optimizer, state, config) -> tuple[list, object]:
    """float64 copies of the parameters after one real torch.optim step on g + 2λΩ(θ−θ*), or
    (proximal) on g alone followed by θ ← (θ' + 2ηλΩθ*) / (1 + 2ηλΩ)."""
    proximal = config.penalty_step == "proximal" and bool(stars)
    leaves = [torch.nn.Parameter(_d(p).clone()) for p in params]
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        folded = stars and not proximal
        leaf.grad = _d(g) + (2 * lam * _d(omegas[i]) * (_d(params[i]) - _d(stars[i])) if folded else 0)
    if not leaves:
        return leaves, None
    opt = make_optimizer(leaves)
    for leaf, st_ in zip(leaves, state):
        if st_:
            opt.state[leaf] = st_
    opt.step()
    if proximal:
        with torch.no_grad():
            for leaf, t, o in zip(leaves, stars, omegas):
                c = 2 * config.lr * lam * _d(o)
                leaf.copy_((leaf + c * _d(t)) / (1 + c))
    return leaves, opt


def _step_value(params, stars, omegas, lam) -> tuple[Tensor, torch.dtype]:
    return _penalty_value(params, stars, omegas, lam) if stars else (torch.zeros((), dtype=D64), torch.float32)


def _sgd_brute(args) -> Expected:
    params, grads, bufs, stars, omegas, h = args
    c = h["config"]
    make = partial(torch.optim.SGD, lr=c.lr, momentum=c.momentum, dampening=c.dampening,
                   weight_decay=c.weight_decay, nesterov=c.nesterov, maximize=c.maximize, foreach=False)
    state = [{"momentum_buffer": _d(b).clone()} if c.momentum and not h["init_buffers"] else {}
             for b in (bufs or params)]
    leaves, opt = _optim_oracle(params, grads, stars, omegas, h["lam"], make, state, c)
    new_bufs = [(opt.state[leaf]["momentum_buffer"].detach(), b.dtype) for leaf, b in zip(leaves, bufs)]
    return [_step_value(params, stars, omegas, h["lam"]),
            *((leaf.detach(), p.dtype) for leaf, p in zip(leaves, params)), *new_bufs]


@st.composite
def _adam_inputs(draw, device, lim):
    params, grads, stars, omegas = draw(_step_tensors(device, lim))
    amsgrad = draw(st.booleans())
    config = AdamConfig(lr=draw(st.floats(1e-4, 0.1)), beta1=draw(st.floats(0, 0.99)),
                        beta2=draw(st.floats(0.5, 0.9999)), eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
                        weight_decay=draw(st.sampled_from([0.0]) | st.floats(0, 0.1)),
                        decoupled_weight_decay=draw(st.booleans()), amsgrad=amsgrad, maximize=draw(st.booleans()),
                        penalty_step=draw(_penalty_steps()))
    hyper = dict(lam=draw(_lams()), config=config)
    exp_avgs = [draw(tensors(p.shape, p.dtype, device, scale=0.1, writable=True)) for p in params]
    exp_avg_sqs = [draw(tensors(p.shape, p.dtype, device, kind="positive", scale=0.01, writable=True))
                   for p in params]
    maxes = [draw(tensors(p.shape, p.dtype, device, kind="positive", scale=0.01, writable=True))
             for p in params] if amsgrad else []
    steps = [torch.tensor(float(draw(st.integers(0, 100))), device=device) for _ in params]
    return params, grads, exp_avgs, exp_avg_sqs, maxes, steps, stars, omegas, hyper


def _adam_run(fn, args) -> list[Tensor]:
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps, stars, omegas, hyper = args
    state = [[fresh(t) for t in group] for group in (params, exp_avgs, exp_avg_sqs, maxes, steps)]
    value = fn(state[0], grads, *state[1:], stars, omegas, **hyper)
    return [value, *(t for group in state for t in group)]


def _adam_brute(args) -> Expected:
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps, stars, omegas, h = args
    c = h["config"]
    optimizer = torch.optim.AdamW if c.decoupled_weight_decay else torch.optim.Adam
    make = partial(optimizer, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps,
                   weight_decay=c.weight_decay, amsgrad=c.amsgrad, maximize=c.maximize, foreach=False)
    state = [{"step": s.detach().clone().cpu(), "exp_avg": _d(m).clone(), "exp_avg_sq": _d(v).clone(),
              **({"max_exp_avg_sq": _d(maxes[i]).clone()} if c.amsgrad else {})}
             for i, (s, m, v) in enumerate(zip(steps, exp_avgs, exp_avg_sqs))]
    leaves, opt = _optim_oracle(params, grads, stars, omegas, h["lam"], make, state, c)
    after = [opt.state[leaf] for leaf in leaves]
    return [_step_value(params, stars, omegas, h["lam"]),
            *((leaf.detach(), p.dtype) for leaf, p in zip(leaves, params)),
            *((a["exp_avg"], m.dtype) for a, m in zip(after, exp_avgs)),
            *((a["exp_avg_sq"], v.dtype) for a, v in zip(after, exp_avg_sqs)),
            *((a["max_exp_avg_sq"], m.dtype) for a, m in zip(after, maxes)),
            *((a["step"].to(D64), s.dtype) for a, s in zip(after, steps))]


def _call(fn, args) -> list[Tensor]:
    return [fn(*args)]


CASES: dict[str, OpCase] = {
    "abs_matmul": OpCase(_abs_matmul_inputs, _call, _abs_matmul_brute),
    "per_sample_abs_matmul": OpCase(_psam_inputs, _call, _psam_brute),
    "per_sample_abs_sum": OpCase(_psas_inputs, _call, _psas_brute),
    "conv_abs_grad": OpCase(_conv_inputs, _call, _conv_brute),
    "embedding_abs_grad": OpCase(_embedding_inputs, _call, _embedding_brute),
    "running_mean_update_": OpCase(_running_mean_inputs, _running_mean_run, _running_mean_brute),
    "merge_": OpCase(_merge_inputs, _merge_run, _merge_brute),
    "penalty": OpCase(_penalty_inputs, _penalty_run, _penalty_brute),
    "penalty_and_grad_": OpCase(lambda device, lim: _penalty_inputs(device, lim, with_grads=True),
                                _penalty_and_grad_run, _penalty_and_grad_brute),
    "sgd_step_": OpCase(_sgd_inputs, _sgd_run, _sgd_brute),
    "adam_step_": OpCase(_adam_inputs, _adam_run, _adam_brute),
}


def tensor_args(args: tuple) -> list[Tensor]:
    """The tensors among an op's arguments, tensor lists included."""
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return [t for t in flat if isinstance(t, Tensor)]


def input_dtypes(args: tuple) -> list[torch.dtype]:
    """The floating dtypes among an op's tensor arguments."""
    return [t.dtype for t in tensor_args(args) if t.is_floating_point()]


def least_precise(dtypes: Sequence[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype with the loosest tolerance (bf16 < fp16 < fp32 < fp64)."""
    order = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    return min(dtypes, key=order.index) if dtypes else None


def check_outputs(actual: list[Tensor], expected: list[tuple[Tensor, torch.dtype]],
                  tol_floor: list[torch.dtype], device: str) -> None:
    """Outputs match the expected (value, dtype) pairs in dtype, shape and device, and in value
    with the tolerance of the least precise of their dtype and `tol_floor`."""
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, (e, dtype)) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype, f"output {i}: dtype {a.dtype}, expected {dtype}"
        assert a.shape == e.shape, f"output {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert a.device.type == device, f"output {i} on {a.device}, inputs on {device}"
        assert_close(a.to(e.dtype), e, least_precise([dtype, *tol_floor]), f"output {i}")
