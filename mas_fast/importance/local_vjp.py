"""The module-local exact path: per-sample importance of a module's own parameters from its
captured calls, at the cost of that module, not of the model.

For one sample k, the gradient of Σ_k ‖F(x_k)‖² with respect to a module's parameters is
the vector-Jacobian product of the module alone: g_k = Σ_calls J_{c,k}ᵀ δ_{c,k}, with the
call's captured inputs (constants) and the gradient δ of its output. It is computed with
torch.func (vmap over samples of grad of Σ ⟨module(inputs_k), δ_k⟩), in bounded chunks of
samples. Modules that share a parameter (tied embedding and output weights) form one group:
their contributions for sample k are summed before the absolute value, so
Σ_k |Σ_uses g_k| is exact without a B × P tensor. Children's parameters are constants.

Where every call of the group is a layer with a per-sample rule (`rule.per_sample`: a tied
embedding and output head) on one batch-first tensor, the per-sample gradients come from that
closed form instead of torch.func: a few samples at a time, each sample's contributions summed
before |·|, as above.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._pytree import tree_flatten

from .capture import Site
from .fallback import per_sample_grad_sum
from .rules import rule_for
from .. import sharding
from ..ops.policy import acc_dtype, samples_per_weight_chunk

Tensor = torch.Tensor


def groups(sites: list[Site]) -> list[list[Site]]:
    """Sites joined by the parameters they share (connected components)."""
    out: list[list[Site]] = []
    names: list[set[str]] = []
    for s in sites:
        mine = set(s.params.values())
        joined = [i for i, ns in enumerate(names) if ns & mine]
        group, merged = [s], set(mine)
        for i in reversed(joined):
            group = out.pop(i) + group
            merged |= names.pop(i)
        out.append(group)
        names.append(merged)
    return out


def _inner_product(output: Any, deltas: list) -> Tensor:
    leaves = tree_flatten(output)[0]
    terms = [(t.to(d.dtype) * d).sum() for t, d in zip(leaves, deltas) if d is not None]
    return sum(terms) if terms else torch.zeros(())


def _closed_form_calls(group: list[Site], calls: list[list], batch: int) -> Optional[list[tuple]]:
    """(site, its rule's per-sample form, x, Δ) per call when every call is of a layer with a
    per-sample rule for all its parameters, on one batch-first tensor, with one output; else None."""
    out = []
    for site, site_calls in zip(group, calls):
        if site.module._forward_hooks or site.module._forward_pre_hooks:  # (the capture's are removed by now)
            return None  # a user's hook may change what the layer computes
        try:
            per_sample = getattr(rule_for(site.module), "per_sample", None)
        except ValueError:  # a layer whose per-sample importance is undefined: torch.func says why
            return None
        if per_sample is None or not set(site.params) <= per_sample.attrs:
            return None
        for args, kwargs, deltas in site_calls:
            if kwargs or len(args) != 1 or len(deltas) != 1:
                return None
            x, delta = args[0], deltas[0]
            if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch or delta.shape[0] != batch:
                return None
            out.append((site, per_sample, x, delta))
    return out


def _closed_form_sums(pieces: list[tuple], params: dict[str, Tensor], batch: int,
                      signed_out: Optional[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Σ_k |Σ_calls g_k| from the rules' per-sample forms, a few samples at a time."""
    names = {n for site, *_ in pieces for n in site.params.values()}
    sums = {n: torch.zeros(params[n].shape, dtype=acc_dtype(params[n].dtype), device=params[n].device)
            for n in names}
    if signed_out is not None:
        signed_out.update({n: torch.zeros_like(t) for n, t in sums.items()})
    step = samples_per_weight_chunk(sum(params[n].numel() for n in names), batch)
    for s in range(0, batch, step):
        g: dict[str, Tensor] = {}
        for site, per_sample, x, delta in pieces:
            for attr, v in per_sample(site.module, x[s:s + step], delta[s:s + step], frozenset(site.params)).items():
                n = site.params[attr]
                g[n] = g[n].add_(v) if n in g else v  # the per-sample forms return fresh tensors
        for n, v in g.items():
            if signed_out is not None:
                signed_out[n] += v.sum(0)
            sums[n] += v.abs_().sum(0)
    return sums


def group_sums(group: list[Site], params: dict[str, Tensor], batch: int,
               signed_out: Optional[dict[str, Tensor]] = None, closed_form: bool = True) -> dict[str, Tensor]:
    """Σ_k |g_k| for the parameters of one group of module-local sites (canonical names), and
    Σ_k g_k into `signed_out` (to verify them). Every site's calls must have been captured with
    their Δs. `closed_form=False` (a layer demoted from its rule) always takes torch.func."""
    calls = [[(args, kwargs, deltas) for (args, kwargs), deltas in s.local_calls
              if any(d is not None for d in deltas)] for s in group]
    pieces = _closed_form_calls(group, calls, batch) if closed_form else None
    if pieces:
        return _closed_form_sums(pieces, params, batch, signed_out)
    wanted = {n: params[n] for s in group for n in s.params.values()}
    # FSDP2: the modules' other parameters (frozen ones, children's) whole, gathered once here
    constants = [sharding.whole_parameters(s.module, s.params, next(iter(wanted.values())).dtype) for s in group]

    def objective(p: dict, sample: list) -> Tensor:
        total = torch.zeros(())
        for site, site_calls, fixed in zip(group, sample, constants):
            own = {**fixed, **{attr: p[name] for attr, name in site.params.items()}}
            for args, kwargs, deltas in site_calls:
                total = total + _inner_product(sharding.functional_call(site.module, own, args, kwargs), deltas)
        return total

    return per_sample_grad_sum(objective, wanted, calls, batch, signed_out=signed_out)


__all__ = ["group_sums", "groups"]
