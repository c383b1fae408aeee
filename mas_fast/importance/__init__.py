"""Importance of one unlabeled batch: Σ over its samples of |g|, per parameter.

Three modes (see DESIGN.md):
- "per_sample": Σ_k |∂‖F(x_k)‖²/∂θ| — the paper. One forward and one backward with
  capture hooks, exact rules per layer type, torch.func fallback for the rest.
- "batch": |∂ Σ_k ‖F(x_k)‖²/∂θ| — the authors' code / Avalanche (signs cancel in a batch).
- "local": each layer's own ‖Y‖² as the function (Hebbian variant): Δ = 2·Y, no backward.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .capture import Site, eval_mode, hooked, stream_deltas, without_autocast
from .fallback import model_per_sample, module_local, squared_norm, warn_once
from .rules import rule_for
from ..ops.policy import acc_dtype

Tensor = torch.Tensor
MODES = ("per_sample", "batch", "local")
OutputFn = Optional[Callable[[Any], Tensor]]


class NonFiniteError(ValueError):
    """NaN or Inf met in a model output or an importance value: nothing was accumulated."""


def batch_size(x: Any) -> int:
    """Number of samples in an input (dimension 0 of its first tensor)."""
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise TypeError(f"the input batch must be a tensor (or a structure of tensors) with a batch "
                        f"dimension, got {type(x).__name__}")
    return leaves[0].shape[0]


def output_tensor(output: Any, output_fn: OutputFn, batch: int) -> Tensor:
    """F = output_fn(model output) (or the output itself), checked: batch-first and finite."""
    F = output_fn(output) if output_fn is not None else output
    if not isinstance(F, Tensor):
        raise TypeError(f"the model returned {type(F).__name__}, not a tensor; pass "
                        "output_fn=... that maps the model's output to the tensor F whose "
                        "squared L2 norm MAS differentiates")
    if F.dim() == 0 or F.shape[0] != batch:
        raise ValueError(f"the model output has shape {tuple(F.shape)}; MAS needs dimension 0 to "
                         f"index the {batch} samples of the batch")
    if not bool(torch.isfinite(F).all()):
        raise NonFiniteError("the model output contains NaN or Inf; importance was not accumulated")
    return F


def sites_of(model: nn.Module, params: dict[str, Tensor], mode: str, batch: int) -> list[Site]:
    """One Site per module holding some of `params` (canonical name → tensor) directly; a rule's
    `claims` (attention's out_proj) fold a child's parameters into its parent's site."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    name_of = {id(p): n for n, p in params.items()}
    claimed: set[int] = set()  # children covered by their parent's rule (modules() is pre-order)
    sites = []
    for m in model.modules():
        if id(m) in claimed:
            continue
        own = {a: name_of[id(p)] for a, p in m.named_parameters(recurse=False) if id(p) in name_of}
        if not own:
            continue
        shared = any(owners[id(m.get_parameter(a))] > 1 for a in own)
        if shared and mode == "local":
            raise ValueError(f"mode='local' is undefined for parameters shared between modules "
                             f"({', '.join(own.values())} in {type(m).__name__}); use "
                             "mode='per_sample'")
        rule = None if shared else rule_for(m)
        for child_name in getattr(rule, "claims", ()):
            child = m.get_submodule(child_name)
            claimed.add(id(child))
            own.update({f"{child_name}.{a}": name_of[id(p)] for a, p in child.named_parameters(recurse=False)
                        if id(p) in name_of and owners[id(p)] == 1})
        sites.append(Site(m, own, rule, batch=batch, keep_calls=mode == "local", shared=shared))
    return sites


def _zeros(p: Tensor) -> Tensor:
    return torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)


def _fallback_reason(site: Site) -> str:
    kind = type(site.module).__name__
    if site.shared:
        return f"{kind} shares parameters with another module"
    if site.rule is None:
        return f"no exact rule for {kind}"
    if site.unmatched is not None:
        return (f"{kind}'s input {site.unmatched} has no single dimension of the batch's size to "
                "index the samples (flattened or seq-first with T == B)")
    return f"{kind} was called {site.calls} times in one forward"


def fallback_notice(sites: list[Site], names: set[str]) -> None:
    """Warn once per cause for the sites whose parameters go to the generic fallback."""
    for s in sites:
        if any(n in names for n in s.params.values()):
            warn_once(_fallback_reason(s))


def _per_sample(model, x, params, output_fn, backend, batch) -> dict[str, Tensor]:
    sites = sites_of(model, params, "per_sample", batch)
    sums: dict[str, Tensor] = {}

    def apply_rule(site: Site, delta: Tensor) -> None:
        for attr, value in site.rule(site.module, site.x, delta, frozenset(site.params), backend).items():
            sums[site.params[attr]] = value

    used = stream_deltas(sites, lambda: squared_norm(output_tensor(model(x), output_fn, batch)),
                         apply_rule, params)
    if used:
        fallback_notice(sites, used)
        output_of = output_fn or (lambda out: out)
        sums.update(model_per_sample(model, x, {n: params[n] for n in used},
                                     lambda out, _: squared_norm(output_of(out)), batch))
    return sums


def _batch(model, x, params, output_fn, batch) -> dict[str, Tensor]:
    with torch.enable_grad():
        F = output_tensor(model(x), output_fn, batch)
        total = squared_norm(F)
        if not total.requires_grad:
            return {}
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {n: g.to(acc_dtype(g.dtype)).abs() for n, g in zip(params, grads) if g is not None}


def _local(model, x, params, output_fn, backend, batch) -> dict[str, Tensor]:
    sites = sites_of(model, params, "local", batch)
    with hooked(sites), torch.no_grad():
        output_tensor(model(x), output_fn, batch)
    sums: dict[str, Tensor] = {}
    for s in sites:
        wanted = frozenset(s.params)
        if s.ruled:
            doubled = tuple(2 * t if isinstance(t, Tensor) else None for t in
                            (s.y if isinstance(s.y, tuple) else (s.y,)))  # Δ = 2Y: ∂‖Y‖²/∂Y
            with without_autocast(doubled[0].device):
                values = s.rule(s.module, s.x, doubled if s.needs_call else s.samples_first(doubled[0]),
                                wanted, backend)
        elif s.calls:
            warn_once(_fallback_reason(s))
            own = {a: getattr(s.module, a) for a in wanted}
            values = module_local(s.module, s.call_args, own, batch)
        else:
            values = {}
        sums.update({s.params[a]: v for a, v in values.items()})
        s.release()
    return sums


def batch_importance(model: nn.Module, x: Any, params: dict[str, Tensor], mode: str,
                     output_fn: OutputFn = None, backend: str = "auto") -> tuple[dict[str, Tensor], int]:
    """Σ over the samples of `x` of |g| for every parameter in `params`, and the sample count.

    Runs in eval mode (each module's mode restored), never touches `.grad`. Every
    returned tensor is float32 (float64 for float64 parameters) and finite, else
    NonFiniteError is raised.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batch = batch_size(x)
    if batch == 0:
        raise ValueError("the input batch is empty (0 samples)")
    with eval_mode(model):
        if mode == "per_sample":
            sums = _per_sample(model, x, params, output_fn, backend, batch)
        elif mode == "batch":
            sums = _batch(model, x, params, output_fn, batch)
        else:
            sums = _local(model, x, params, output_fn, backend, batch)
    result = {n: sums[n] if n in sums else _zeros(p) for n, p in params.items()}
    peaks = [v.amax() for v in result.values() if v.numel()]
    if peaks and not bool(torch.isfinite(torch.stack([p.to(torch.float64) for p in peaks])).all()):
        bad = [n for n, v in result.items() if v.numel() and not bool(torch.isfinite(v).all())]
        raise NonFiniteError(f"importance is NaN or Inf for {', '.join(bad)} (gradients overflowed); "
                             "nothing was accumulated")
    return result, batch


__all__ = ["MODES", "NonFiniteError", "batch_importance", "batch_size", "fallback_notice", "output_tensor",
           "sites_of"]
