"""Generic per-sample importance with torch.func (vmap of grad), in bounded chunks.

Correct for any module (custom layers, parameters used outside their module's
forward, shared weights, modules called several times), but it costs a per-sample
gradient of the whole model: the exact rules in rules.py are preferred wherever they apply.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .. import sharding
from ..ops.policy import acc_dtype, samples_per_chunk
from .objective import squared_norm

Tensor = torch.Tensor

def _batched_mask(tree: Any, batch: int) -> Any:
    """True for tensor leaves whose dimension 0 indexes samples (size == batch)."""
    return tree_map(lambda a: isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch, tree)


def per_sample_grad_sum(
    fn: Callable[[dict, Any], Tensor],
    params: dict[str, Tensor],
    inputs: Any,
    batch: int,
    statistic: Callable[[Tensor], Tensor] = torch.abs,
    signed_out: Optional[dict[str, Tensor]] = None,
) -> dict[str, Tensor]:
    """Σ_k statistic(∂ fn(params, inputs_k) / ∂params) over the samples k of `inputs` (|·| by default).

    `fn` receives one sample's inputs with the batch dimension kept (size 1). Tensor
    leaves of `inputs` whose dimension 0 has size `batch` are split per sample; the
    others are shared. Chunks bound the per-sample gradients to `chunk_elements()`.
    `torch.square` as the statistic gives Σ_k g_k², a diagonal Fisher. With `signed_out`
    (a dict), Σ_k g_k — the batch gradient, for verification — is written there too.
    """
    mask = _batched_mask(inputs, batch)
    leaves, spec = tree_flatten(inputs)
    mask_leaves = tree_flatten(mask)[0]
    if not any(mask_leaves):
        raise ValueError(f"no input tensor has the batch's {batch} samples in dimension 0 (shapes "
                         f"{[tuple(t.shape) for t in leaves if isinstance(t, Tensor)]}): the per-sample "
                         "fallback needs batch-first inputs")
    in_dims = tree_unflatten([0 if m else None for m in mask_leaves], spec)

    def one_sample(p: dict, sample: Any) -> Tensor:
        sample = tree_map(lambda a, m: a.unsqueeze(0) if m else a, sample, mask)
        return fn(p, sample)

    per_sample = vmap(grad(one_sample), in_dims=(None, in_dims))
    detached = {n: p.detach() for n, p in params.items()}
    sums = {n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device) for n, p in params.items()}
    if signed_out is not None:
        signed_out.update({n: torch.zeros_like(t) for n, t in sums.items()})
    step = samples_per_chunk(sum(p.numel() for p in params.values()), batch)
    # no_grad outside the transform: grad() still differentiates `fn`, but the results do not
    # join an outer graph through the model's other parameters, which would keep every chunk's
    # per-sample gradients alive (O(B·P)) and attach a graph to Ω.
    with torch.no_grad(), warnings.catch_warnings():
        # torch's note that some op (CPU flash attention) has no vmap batching rule yet: the
        # result is exact, only slower, and the note would repeat on every pass.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        for s in range(0, batch, step):
            chunk = tree_unflatten([a[s:s + step] if m else a for a, m in zip(leaves, mask_leaves)], spec)
            for n, g in per_sample(detached, chunk).items():
                g = g.to(sums[n].dtype)
                sums[n] += statistic(g).sum(0)
                if signed_out is not None:
                    signed_out[n] += g.sum(0)
    return sums


def _holders(model: nn.Module, params: dict[str, Tensor]) -> dict[str, str]:
    """Path of every (module, attribute) that holds one of `params` → its canonical name.

    One path per module object: torch's `tie_weights` lists a module reachable under two
    names (`self.alias = self.twice`) twice and, restoring in order, leaves a functional
    tensor in place of the module's Parameter.
    """
    canonical = {id(p): n for n, p in params.items()}
    return {f"{prefix}.{attr}" if prefix else attr: canonical[id(p)]
            for prefix, m in model.named_modules()
            for attr, p in m.named_parameters(recurse=False, remove_duplicate=False) if id(p) in canonical}


def model_per_sample(model: nn.Module, x: Any, params: dict[str, Tensor],
                     objective: Callable[[Any, Any], Tensor], batch: int, extra: Any = None,
                     statistic: Callable[[Tensor], Tensor] = torch.abs) -> dict[str, Tensor]:
    """Σ_k statistic(∂ objective(model(x_k), extra_k) / ∂params) for `params` (canonical names).

    MAS: objective(out, _) = ‖F(out)‖²; EWC: objective(out, y_k) = loss with the label.
    """
    holders = _holders(model, params)

    def fn(p: dict, sample: tuple[Any, Any]) -> Tensor:
        bound = {path: p[name] for path, name in holders.items()}
        return objective(functional_call(model, bound, (sample[0],), tie_weights=False), sample[1])

    return per_sample_grad_sum(fn, params, (x, extra), batch, statistic)


def module_local(module: nn.Module, calls: Sequence[tuple[tuple, dict]], params: dict[str, Tensor],
                 batch: int) -> dict[str, Tensor]:
    """Local variant for one module: per-sample grad of Σ_calls ‖module(args)‖² w.r.t. its own params.

    `params` maps the module's own attribute names to tensors (whole, under FSDP2).
    """
    constants = sharding.whole_parameters(module, params, next(iter(params.values())).dtype)  # FSDP2

    def fn(p: dict, calls_k: Sequence[tuple[tuple, dict]]) -> Tensor:
        return sum(squared_norm(sharding.functional_call(module, {**constants, **p}, args, kwargs))
                   for args, kwargs in calls_k)

    return per_sample_grad_sum(fn, params, list(calls), batch)
