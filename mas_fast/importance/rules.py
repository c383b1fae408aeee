"""Exact per-sample importance rules, one per layer type.

A rule gets a module, its captured input X and output-gradient Δ (for the local
variant Δ = 2·Y, the gradient of the layer's own ‖Y‖²) and returns, for each wanted
parameter attribute, Σ_k |g_k| over the samples of the batch. Rules only reshape and
call ops; the arithmetic lives behind the kernel boundary (mas_fast.ops).

A rule marked `needs_call` (attention) gets the whole call `(args, kwargs)` for X and a
tuple of output gradients for Δ; its `claims` names child modules whose parameters the
module uses directly (they are covered by the parent's rule, not by their own).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.policy import acc_dtype
from .fallback import per_sample_grad_sum

Tensor = torch.Tensor
Rule = Callable[[nn.Module, Tensor, Tensor, frozenset, str], dict]


def _batched(module: nn.Module, x: Tensor, min_dim: int) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"{type(module).__name__} received an input of shape {tuple(x.shape)} without a batch "
            f"dimension; MAS needs batched inputs (dimension 0 indexes samples)")


def _bias_and_weight(module: nn.Module, wanted: frozenset, delta_btc: Tensor,
                     weight_fn: Callable[[], Tensor], backend: str) -> dict:
    out = {}
    if "weight" in wanted:
        out["weight"] = weight_fn()
    if "bias" in wanted:
        out["bias"] = ops.per_sample_abs_sum(delta_btc, backend=backend)
    return out


def linear_rule(module: nn.Linear, x: Tensor, delta: Tensor, wanted: frozenset, backend: str) -> dict:
    """Linear on (B, in) via |Δ|ᵀ|X|; on (B, ..., in) via a per-sample reduction over positions."""
    _batched(module, x, 2)
    B = x.shape[0]
    if x.dim() == 2:
        return _bias_and_weight(module, wanted, delta.unsqueeze(1),
                                lambda: ops.abs_matmul(delta, x, backend=backend), backend)
    x3 = x.reshape(B, -1, x.shape[-1])
    d3 = delta.reshape(B, -1, delta.shape[-1])
    return _bias_and_weight(
        module, wanted, d3,
        lambda: ops.per_sample_abs_matmul(d3.unsqueeze(1), x3.unsqueeze(1), backend=backend)[0], backend)


def _signed_bias_and_weight(wanted: frozenset, delta: Tensor, weight_fn: Callable[[], Tensor],
                            positions: int = 0) -> dict:
    """Signed twin of `_bias_and_weight`: the bias sums `delta` over dimension `positions`. The
    batch sums take delta (N, C), every position of every sample (positions 0); the per-sample
    forms take (c, T, C) and keep one row per sample (positions 1)."""
    out = {}
    if "weight" in wanted:
        out["weight"] = weight_fn()
    if "bias" in wanted:
        out["bias"] = delta.sum(positions)
    return out


def linear_signed(module: nn.Linear, x: Tensor, delta: Tensor, wanted: frozenset, backend: str) -> dict:
    """Σ_k g_k of a Linear: Δᵀ X over all leading dimensions."""
    dt = acc_dtype(x.dtype, delta.dtype)
    d2 = delta.reshape(-1, delta.shape[-1]).to(dt)
    return _signed_bias_and_weight(wanted, d2, lambda: d2.t() @ x.reshape(-1, x.shape[-1]).to(dt))


linear_rule.signed = linear_signed


def linear_per_sample(module: nn.Linear, x: Tensor, delta: Tensor, wanted: frozenset) -> dict:
    """Per-sample gradients g_k of a Linear's parameters, samples first: weight (c, out, in) =
    Σ_t δ_kt x_ktᵀ, bias (c, out) = Σ_t δ_kt (a few samples at a time: c weights)."""
    dt = acc_dtype(x.dtype, delta.dtype)
    c = x.shape[0]
    d3 = delta.reshape(c, -1, delta.shape[-1]).to(dt)
    return _signed_bias_and_weight(
        wanted, d3, lambda: d3.transpose(1, 2) @ x.reshape(c, -1, x.shape[-1]).to(dt), positions=1)


linear_per_sample.attrs = frozenset({"weight", "bias"})  # what it computes (weight_norm's g, v it does not)
linear_rule.per_sample = linear_per_sample


def _conv_geometry(module: nn.Module, x: Tensor):
    """Input padded as the convolution sees it, and the remaining symmetric zero padding."""
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if module.padding == "valid":
        return x, (0,) * nd
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


def conv_rule(module: nn.Module, x: Tensor, delta: Tensor, wanted: frozenset, backend: str) -> dict:
    """Conv1d/Conv2d (any stride, padding, dilation, groups, padding mode)."""
    nd = len(module.kernel_size)
    _batched(module, x, nd + 2)
    xp, padding = _conv_geometry(module, x)
    stride, dilation, kernel = tuple(module.stride), tuple(module.dilation), tuple(module.kernel_size)
    d = delta
    if nd == 1:  # a 1-D convolution is a 2-D one of height 1
        xp, d = xp.unsqueeze(-2), d.unsqueeze(-2)
        stride, dilation, kernel, padding = (1,) + stride, (1,) + dilation, (1,) + kernel, (0,) + padding
    weight_shape = tuple(module.weight.shape[:2]) + kernel
    B, C = delta.shape[:2]

    def weight() -> Tensor:
        w = ops.conv_abs_grad(d, xp, weight_shape, stride, padding, dilation, module.groups,
                              backend=backend)
        return w.reshape(module.weight.shape)

    return _bias_and_weight(module, wanted, delta.reshape(B, C, -1).transpose(1, 2), weight, backend)


def conv_signed(module: nn.Module, x: Tensor, delta: Tensor, wanted: frozenset, backend: str) -> dict:
    """Σ_k g_k of a convolution: torch.nn.grad.conv{1,2}d_weight on the padded input."""
    nd = len(module.kernel_size)
    dt = acc_dtype(x.dtype, delta.dtype)
    xp, padding = _conv_geometry(module, x)
    weight_grad = torch.nn.grad.conv1d_weight if nd == 1 else torch.nn.grad.conv2d_weight
    C = delta.shape[1]
    return _signed_bias_and_weight(
        wanted, delta.to(dt).transpose(0, 1).reshape(C, -1).t(),
        lambda: weight_grad(xp.to(dt), module.weight.shape, delta.to(dt), module.stride, padding,
                            module.dilation, module.groups))


conv_rule.signed = conv_signed


def _affine(module: nn.Module, x_hat: Tensor, delta: Tensor, channels_last: bool,
            wanted: frozenset, backend: str) -> dict:
    """Norm-affine rule: γ gets Σ_k |Σ_t δ x̂|, β gets Σ_k |Σ_t δ|; shapes (B, T, C)."""
    B = delta.shape[0]
    if channels_last:  # normalised dims trail: (B, ..., *shape)
        C = module.weight.numel() if module.weight is not None else module.bias.numel()
        d3, s3 = delta.reshape(B, -1, C), x_hat.reshape(B, -1, C)
    else:  # channel dim 1: (B, C, *)
        C = delta.shape[1]
        d3 = delta.reshape(B, C, -1).transpose(1, 2)
        s3 = x_hat.reshape(B, C, -1).transpose(1, 2)
    shape = (module.weight if module.weight is not None else module.bias).shape
    out = _bias_and_weight(module, wanted, d3,
                           lambda: ops.per_sample_abs_sum(d3, s3, backend=backend), backend)
    return {k: v.reshape(shape) for k, v in out.items()}


def _affine_signed(module: nn.Module, x_hat: Tensor, delta: Tensor, channels_last: bool,
                   wanted: frozenset) -> dict:
    """Signed twin of `_affine`: γ gets Σ δ x̂, β gets Σ δ over samples and positions."""
    dt = acc_dtype(delta.dtype, x_hat.dtype)
    shape = (module.weight if module.weight is not None else module.bias).shape
    C = math.prod(shape) if channels_last else delta.shape[1]
    if channels_last:
        d2, s2 = delta.to(dt).reshape(-1, C), x_hat.to(dt).reshape(-1, C)
    else:
        d2 = delta.to(dt).transpose(0, 1).reshape(C, -1).t()
        s2 = x_hat.to(dt).transpose(0, 1).reshape(C, -1).t()
    out = _signed_bias_and_weight(wanted, d2, lambda: (d2 * s2).sum(0))
    return {k: v.reshape(shape) for k, v in out.items()}


def _layer_norm_hat(module: nn.LayerNorm, x: Tensor) -> Tensor:
    _batched(module, x, len(module.normalized_shape) + 1)
    return F.layer_norm(x.to(acc_dtype(x.dtype)), module.normalized_shape, eps=module.eps)


def _rms_norm_hat(module: nn.Module, x: Tensor) -> Tensor:
    _batched(module, x, len(module.normalized_shape) + 1)
    return F.rms_norm(x.to(acc_dtype(x.dtype)), module.normalized_shape, eps=module.eps)


def _group_norm_hat(module: nn.GroupNorm, x: Tensor) -> Tensor:
    _batched(module, x, 2)
    return F.group_norm(x.to(acc_dtype(x.dtype)), module.num_groups, eps=module.eps)


def _batch_norm_hat(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    _batched(module, x, 2)
    dt = acc_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(dt).view(shape)
    var = module.running_var.to(dt).view(shape)
    return (x.to(dt) - mean) / torch.sqrt(var + module.eps)


def layer_norm_rule(module: nn.LayerNorm, x, delta, wanted, backend) -> dict:
    return _affine(module, _layer_norm_hat(module, x), delta, True, wanted, backend)


def rms_norm_rule(module: nn.Module, x, delta, wanted, backend) -> dict:
    return _affine(module, _rms_norm_hat(module, x), delta, True, wanted, backend)


def group_norm_rule(module: nn.GroupNorm, x, delta, wanted, backend) -> dict:
    return _affine(module, _group_norm_hat(module, x), delta, False, wanted, backend)


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, x, delta, wanted, backend) -> dict:
    """BatchNorm in eval mode: x̂ uses the running statistics, so samples are independent."""
    return _affine(module, _batch_norm_hat(module, x), delta, False, wanted, backend)


layer_norm_rule.signed = lambda m, x, d, wanted, backend: _affine_signed(m, _layer_norm_hat(m, x), d, True, wanted)
rms_norm_rule.signed = lambda m, x, d, wanted, backend: _affine_signed(m, _rms_norm_hat(m, x), d, True, wanted)
group_norm_rule.signed = lambda m, x, d, wanted, backend: _affine_signed(m, _group_norm_hat(m, x), d, False, wanted)
batch_norm_rule.signed = lambda m, x, d, wanted, backend: _affine_signed(m, _batch_norm_hat(m, x), d, False, wanted)


def embedding_rule(module: nn.Embedding, x, delta, wanted, backend) -> dict:
    if x.dim() < 1 or delta.dim() < 2:
        raise ValueError("Embedding received an input without a batch dimension")
    B = x.shape[0]
    idx = x.reshape(B, -1)
    return {"weight": ops.embedding_abs_grad(idx, delta.reshape(B, idx.shape[1], -1),
                                             module.num_embeddings, module.padding_idx,
                                             backend=backend)}


def embedding_signed(module: nn.Embedding, x, delta, wanted, backend) -> dict:
    """Σ_k g_k of an Embedding: every position's δ added into its row (padding row stays 0)."""
    dt = acc_dtype(delta.dtype)
    idx = x.reshape(-1).long()
    d = delta.reshape(idx.numel(), -1).to(dt)
    if module.padding_idx is not None:
        d = d * (idx != module.padding_idx % module.num_embeddings).unsqueeze(1).to(dt)
    out = torch.zeros(module.num_embeddings, d.shape[1], dtype=dt, device=d.device)
    return {"weight": out.index_add_(0, idx, d)}


embedding_rule.signed = embedding_signed


def embedding_per_sample(module: nn.Embedding, x: Tensor, delta: Tensor, wanted: frozenset) -> dict:
    """Per-sample gradients of an Embedding's weight, (c, V, D): each sample's positions' δ
    added into its own copy of the table (padding row 0)."""
    c, V = x.shape[0], module.num_embeddings
    dt = acc_dtype(delta.dtype)
    idx = x.reshape(c, -1).long()
    d = delta.reshape(idx.numel(), -1).to(dt)
    if module.padding_idx is not None:
        d = d * (idx.reshape(-1) != module.padding_idx % V).unsqueeze(1).to(dt)
    rows = (idx + V * torch.arange(c, device=idx.device).unsqueeze(1)).reshape(-1)
    out = torch.zeros(c * V, d.shape[1], dtype=dt, device=d.device)
    return {"weight": out.index_add_(0, rows, d).view(c, V, -1)}


embedding_per_sample.attrs = frozenset({"weight"})
embedding_rule.per_sample = embedding_per_sample


def _mha_arguments(module: nn.MultiheadAttention, call: tuple) -> dict:
    """The call's bound arguments (defaults applied), after checking the query is batched."""
    args, kwargs = call
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["query"].dim() != 3:
        raise ValueError(f"MultiheadAttention received a query of shape {tuple(a['query'].shape)} without a "
                         "batch dimension; MAS needs batched inputs")
    return a


def _mha_closed_form_applies(module: nn.MultiheadAttention, deltas: tuple) -> bool:
    """The closed form covers the projections when only the output reaches F; bias_k / bias_v,
    zero attention, attention weights in F and dropout in training take the per-sample VJP."""
    return (deltas[0] is not None and deltas[1] is None and module.bias_k is None
            and module.bias_v is None and not module.add_zero_attn
            and not (module.training and module.dropout > 0))


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: not attended) as the additive -inf mask torch's attention builds."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _mha_projection_grads(module: nn.MultiheadAttention, a: dict, delta: Tensor, wanted: frozenset) -> dict:
    """Batch-first pieces of attention's closed form: inputs x (B, L|S, E_in) of the q, k, v
    projections, their output gradients δ from one autograd VJP of the attention core (no
    per-sample loop; skipped when only out_proj is wanted), the core's output o (B, L, E) and Δ,
    the gradient of out_proj's output. The core is torch's: masks merged as
    F.multi_head_attention_forward merges them."""
    bdim = 0 if module.batch_first else 1
    xs = [a[n].movedim(bdim, 0) for n in ("query", "key", "value")]
    B, L, E = xs[0].shape
    S, H = xs[1].shape[1], module.num_heads
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.detach().chunk(3)
    else:
        weights = [module.get_parameter(f"{n}_proj_weight").detach() for n in "qkv"]
    biases = [None] * 3 if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
    padding = _additive_mask(a["key_padding_mask"], xs[0].dtype)
    causal = a["is_causal"] and padding is None and not a["need_weights"]
    mask = None if causal else _additive_mask(a["attn_mask"], xs[0].dtype)
    if mask is not None and mask.dim() == 3:  # (B·H, L, S)
        mask = mask.view(B, H, L, S)
    if padding is not None:
        padding = padding.view(B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    in_projections = bool(wanted - {"out_proj.weight", "out_proj.bias"})
    d_out = delta.movedim(bdim, 0)
    with torch.set_grad_enabled(in_projections):
        qkv = [F.linear(x.detach(), w, b).requires_grad_(in_projections) for x, w, b in zip(xs, weights, biases)]
        heads = [t.view(B, -1, H, E // H).transpose(1, 2) for t in qkv]
        o = F.scaled_dot_product_attention(*heads, attn_mask=mask, is_causal=causal)
        o = o.transpose(1, 2).reshape(B, L, E)
        deltas = torch.autograd.grad(o, qkv, d_out @ module.out_proj.weight.detach()) if in_projections else ()
    return {"x": xs, "delta": list(deltas), "o": o.detach(), "d_out": d_out}


def _mha_closed_form(module: nn.MultiheadAttention, pieces: dict, wanted: frozenset,
                     weight_fn: Callable[[Tensor, Tensor], Tensor],
                     bias_fn: Callable[[Tensor], Tensor]) -> dict:
    """Each wanted parameter from the pieces: a projection's weight from weight_fn(δ, x) (both
    (B, T, ·)), a bias from bias_fn(δ); in_proj stacks q, k, v along its rows."""
    x, d = pieces["x"], pieces["delta"]
    out = {}
    if "out_proj.weight" in wanted:
        out["out_proj.weight"] = weight_fn(pieces["d_out"], pieces["o"])
    if "out_proj.bias" in wanted:
        out["out_proj.bias"] = bias_fn(pieces["d_out"])
    if "in_proj_weight" in wanted:
        out["in_proj_weight"] = torch.cat([weight_fn(di, xi) for di, xi in zip(d, x)])
    for i, n in enumerate("qkv"):
        if f"{n}_proj_weight" in wanted:
            out[f"{n}_proj_weight"] = weight_fn(d[i], x[i])
    if "in_proj_bias" in wanted:
        out["in_proj_bias"] = torch.cat([bias_fn(di) for di in d])
    return out


def _abs_fns(backend: str) -> tuple[Callable, Callable]:
    return (lambda d, x: ops.per_sample_abs_matmul(d.unsqueeze(1), x.unsqueeze(1), backend=backend)[0],
            lambda d: ops.per_sample_abs_sum(d, backend=backend))


def _signed_fns() -> tuple[Callable, Callable]:
    def weight(d: Tensor, x: Tensor) -> Tensor:
        dt = acc_dtype(d.dtype, x.dtype)
        return d.reshape(-1, d.shape[-1]).to(dt).t() @ x.reshape(-1, x.shape[-1]).to(dt)
    return weight, lambda d: d.reshape(-1, d.shape[-1]).to(acc_dtype(d.dtype)).sum(0)


def _mha_vjp(module: nn.MultiheadAttention, a: dict, deltas: tuple, wanted: frozenset):
    """(objective, params, per-sample inputs, B) of attention's per-sample VJP."""
    bdim = 0 if module.batch_first else 1
    B = a["query"].shape[bdim]
    batched = {n: a[n].movedim(bdim, 0) for n in ("query", "key", "value")}
    out_delta = deltas[0] if deltas[0] is not None else torch.zeros_like(a["query"])  # only weights used
    batched["delta"] = out_delta.movedim(bdim, 0)
    if deltas[1] is not None:  # the attention weights reach the objective too: (B, [H,] L, S)
        batched["delta_weights"] = deltas[1]
    if a["key_padding_mask"] is not None:
        batched["key_padding_mask"] = a["key_padding_mask"]
    mask = a["attn_mask"]
    if mask is not None and mask.dim() == 3:  # (B·H, L, S): one (H, L, S) mask per sample
        batched["attn_mask"] = mask.reshape(B, module.num_heads, *mask.shape[1:])
    shared_mask = mask if mask is not None and mask.dim() == 2 else None
    options = dict(need_weights=deltas[1] is not None, average_attn_weights=a["average_attn_weights"],
                   is_causal=a["is_causal"])

    def objective(p: dict, sample: dict) -> Tensor:
        one = {n: t.squeeze(0) for n, t in sample.items()}  # unbatched: (L, E), (S,), (H, L, S)
        out, weights = torch.func.functional_call(
            module, p, (one["query"], one["key"], one["value"]),
            dict(options, key_padding_mask=one.get("key_padding_mask"),
                 attn_mask=one.get("attn_mask", shared_mask)))
        value = (out * one["delta"]).sum()
        if "delta_weights" in one:
            value = value + (weights * one["delta_weights"]).sum()
        return value

    params = {attr: module.get_parameter(attr) for attr in wanted}
    return objective, params, batched, B


def mha_rule(module: nn.MultiheadAttention, call: tuple, deltas: tuple, wanted: frozenset,
             backend: str) -> dict:
    """nn.MultiheadAttention. When only its output reaches F: closed form, g_k of a projection
    is Σ_t δ_kt x_ktᵀ, with the δ of q, k, v from one batched VJP of the attention core.
    Otherwise (bias_k / bias_v, add_zero_attn, attention weights in F): g_k = J_kᵀ δ_k, a
    per-sample VJP of the attention module alone (torch.func, in chunks of samples).
    """
    a = _mha_arguments(module, call)
    if _mha_closed_form_applies(module, deltas):
        pieces = _mha_projection_grads(module, a, deltas[0], wanted)
        return _mha_closed_form(module, pieces, wanted, *_abs_fns(backend))
    return per_sample_grad_sum(*_mha_vjp(module, a, deltas, wanted))


def mha_signed(module: nn.MultiheadAttention, call: tuple, deltas: tuple, wanted: frozenset,
               backend: str) -> dict:
    """Σ_k g_k of attention: the same pieces, summed without the absolute value."""
    a = _mha_arguments(module, call)
    if _mha_closed_form_applies(module, deltas):
        return _mha_closed_form(module, _mha_projection_grads(module, a, deltas[0], wanted), wanted,
                                *_signed_fns())
    return per_sample_grad_sum(*_mha_vjp(module, a, deltas, wanted), statistic=lambda g: g)


def mha_with_signed(module: nn.MultiheadAttention, call: tuple, deltas: tuple, wanted: frozenset,
                    backend: str) -> tuple[dict, dict]:
    """(Σ_k |g_k|, Σ_k g_k) of attention from one set of pieces: a verified batch pays for one."""
    a = _mha_arguments(module, call)
    if _mha_closed_form_applies(module, deltas):
        pieces = _mha_projection_grads(module, a, deltas[0], wanted)
        return (_mha_closed_form(module, pieces, wanted, *_abs_fns(backend)),
                _mha_closed_form(module, pieces, wanted, *_signed_fns()))
    signed: dict = {}
    return per_sample_grad_sum(*_mha_vjp(module, a, deltas, wanted), signed_out=signed), signed


mha_rule.signed = mha_signed
mha_rule.with_signed = mha_with_signed


mha_rule.needs_call = True
mha_rule.claims = ("out_proj",)

# Where each rule may find the samples in its input. Linear, LayerNorm, RMSNorm and Embedding
# take any leading dimensions (seq-first (T, B, E) included); convolutions and BatchNorm /
# GroupNorm are batch-first by their API; attention by its `batch_first`. The capture hook
# picks the one candidate whose size is the batch's, and leaves the layer to the generic
# fallback when none or several match (flattened tokens, T == B).
linear_rule.sample_dims = lambda m, x: range(x.dim() - 1)
layer_norm_rule.sample_dims = rms_norm_rule.sample_dims = \
    lambda m, x: range(x.dim() - len(m.normalized_shape))
embedding_rule.sample_dims = lambda m, x: range(x.dim())
conv_rule.sample_dims = group_norm_rule.sample_dims = batch_norm_rule.sample_dims = lambda m, x: (0,)
mha_rule.sample_dims = lambda m, query: (0 if m.batch_first else 1,) if query.dim() == 3 else ()


def _batch_norm_reason(module: nn.Module) -> Optional[str]:
    if module.running_mean is None or module.running_var is None:
        return (f"{type(module).__name__} without running statistics normalises with batch "
                "statistics even in eval mode, which couples the samples: per-sample importance "
                "is undefined for it; use mode='batch' or track_running_stats=True")
    return None


def _embedding_reason(module: nn.Module) -> Optional[str]:
    # scale_grad_by_freq couples positions by their counts: the generic fallback handles it.
    return "fallback" if module.scale_grad_by_freq else None


def _same_forward(cls: type) -> Callable[[nn.Module], bool]:
    """Instances of `cls` (subclasses included) that keep `cls`'s forward."""
    return lambda module: isinstance(module, cls) and type(module).forward is cls.forward


Matcher = Callable[[nn.Module], bool]
_RULES: list[tuple[Matcher, Rule, Optional[Callable[[nn.Module], Optional[str]]]]] = [
    (_same_forward(nn.Linear), linear_rule, None),
    (_same_forward(nn.Conv1d), conv_rule, None),
    (_same_forward(nn.Conv2d), conv_rule, None),
    (_same_forward(nn.LayerNorm), layer_norm_rule, None),
    (_same_forward(nn.GroupNorm), group_norm_rule, None),
    (_same_forward(nn.modules.batchnorm._BatchNorm), batch_norm_rule, _batch_norm_reason),
    (_same_forward(nn.Embedding), embedding_rule, _embedding_reason),
    (_same_forward(nn.MultiheadAttention), mha_rule, None),
]
if hasattr(nn, "RMSNorm"):
    _RULES.append((_same_forward(nn.RMSNorm), rms_norm_rule, None))

# Library layers (HF, timm), recognised by their code; imported last: they reuse the helpers above.
from .zoo_rules import ZOO_RULES  # noqa: E402

_RULES += ZOO_RULES


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The exact rule for this module, or None when the generic fallback must handle it.

    A module qualifies by what it computes: a torch layer (or a subclass) that keeps the
    layer's forward, or a library layer whose forward is the known implementation's code
    (zoo_rules.KnownForward). Raises ValueError for modules whose per-sample importance
    is undefined.
    """
    for matches, rule, reason_fn in _RULES:
        if matches(module):
            reason = reason_fn(module) if reason_fn else None
            if reason == "fallback":
                return None
            if reason:
                raise ValueError(reason)
            return rule
    return None
