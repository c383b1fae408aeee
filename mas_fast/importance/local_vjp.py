"""The module-local exact path: per-sample importance of a module's own parameters from its
captured calls, at the cost of that module, not of the model.

For one sample k, the gradient of Σ_k ‖F(x_k)‖² with respect to a module's parameters is
the vector-Jacobian product of the module alone: g_k = Σ_calls J_{c,k}ᵀ δ_{c,k}, with the
call's captured inputs (constants) and the gradient δ of its output. It is computed with
torch.func (vmap over samples of grad of Σ ⟨module(inputs_k), δ_k⟩), in bounded chunks of
samples. Modules that share a parameter (tied embedding and output weights) form one group:
their contributions for sample k are summed before the absolute value, so
Σ_k |Σ_uses g_k| is exact without a B × P tensor. Children's parameters are constants.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .capture import Site
from .fallback import per_sample_grad_sum
from .. import sharding

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


def group_sums(group: list[Site], params: dict[str, Tensor], batch: int,
               signed_out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Σ_k |g_k| for the parameters of one group of module-local sites (canonical names), and
    Σ_k g_k into `signed_out`. Every site's calls must have been captured with their Δs."""
    calls = [[(args, kwargs, deltas) for (args, kwargs), deltas in s.local_calls
              if any(d is not None for d in deltas)] for s in group]
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
