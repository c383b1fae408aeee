"""Exact per-sample importance rules, one per layer type.

A rule gets a module, its captured input X and output-gradient Δ (for the local
variant Δ = 2·Y, the gradient of the layer's own ‖Y‖²) and returns, for each wanted
parameter attribute, Σ_k |g_k| over the samples of the batch. Rules only reshape and
call ops; the arithmetic lives behind the kernel boundary (mas_fast.ops).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.reference import acc_dtype

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


def layer_norm_rule(module: nn.LayerNorm, x, delta, wanted, backend) -> dict:
    _batched(module, x, len(module.normalized_shape) + 1)
    x_hat = F.layer_norm(x.to(acc_dtype(x.dtype)), module.normalized_shape, eps=module.eps)
    return _affine(module, x_hat, delta, True, wanted, backend)


def rms_norm_rule(module: nn.Module, x, delta, wanted, backend) -> dict:
    _batched(module, x, len(module.normalized_shape) + 1)
    x_hat = F.rms_norm(x.to(acc_dtype(x.dtype)), module.normalized_shape, eps=module.eps)
    return _affine(module, x_hat, delta, True, wanted, backend)


def group_norm_rule(module: nn.GroupNorm, x, delta, wanted, backend) -> dict:
    _batched(module, x, 2)
    x_hat = F.group_norm(x.to(acc_dtype(x.dtype)), module.num_groups, eps=module.eps)
    return _affine(module, x_hat, delta, False, wanted, backend)


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, x, delta, wanted, backend) -> dict:
    """BatchNorm in eval mode: x̂ uses the running statistics, so samples are independent."""
    _batched(module, x, 2)
    dt = acc_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(dt).view(shape)
    var = module.running_var.to(dt).view(shape)
    x_hat = (x.to(dt) - mean) / torch.sqrt(var + module.eps)
    return _affine(module, x_hat, delta, False, wanted, backend)


def embedding_rule(module: nn.Embedding, x, delta, wanted, backend) -> dict:
    if x.dim() < 1 or delta.dim() < 2:
        raise ValueError("Embedding received an input without a batch dimension")
    B = x.shape[0]
    idx = x.reshape(B, -1)
    return {"weight": ops.embedding_abs_grad(idx, delta.reshape(B, idx.shape[1], -1),
                                             module.num_embeddings, module.padding_idx,
                                             backend=backend)}


def _batch_norm_reason(module: nn.Module) -> Optional[str]:
    if module.running_mean is None or module.running_var is None:
        return (f"{type(module).__name__} without running statistics normalises with batch "
                "statistics even in eval mode, which couples the samples: per-sample importance "
                "is undefined for it; use mode='batch' or track_running_stats=True")
    return None


def _embedding_reason(module: nn.Module) -> Optional[str]:
    # scale_grad_by_freq couples positions by their counts: the generic fallback handles it.
    return "fallback" if module.scale_grad_by_freq else None


_RULES: list[tuple[type, Rule, Optional[Callable[[nn.Module], Optional[str]]]]] = [
    (nn.Linear, linear_rule, None),
    (nn.Conv1d, conv_rule, None),
    (nn.Conv2d, conv_rule, None),
    (nn.LayerNorm, layer_norm_rule, None),
    (nn.GroupNorm, group_norm_rule, None),
    (nn.modules.batchnorm._BatchNorm, batch_norm_rule, _batch_norm_reason),
    (nn.Embedding, embedding_rule, _embedding_reason),
]
if hasattr(nn, "RMSNorm"):
    _RULES.append((nn.RMSNorm, rms_norm_rule, None))


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The exact rule for this module, or None when the generic fallback must handle it.

    A subclass qualifies only if it keeps the base class's forward (so the rule's maths
    still describes what the module computes). Raises ValueError for modules whose
    per-sample importance is undefined.
    """
    for cls, rule, reason_fn in _RULES:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            reason = reason_fn(module) if reason_fn else None
            if reason == "fallback":
                return None
            if reason:
                raise ValueError(reason)
            return rule
    return None
