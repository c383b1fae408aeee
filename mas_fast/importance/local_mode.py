"""mode="local" (the Hebbian variant): each layer's own output Y is the function.

For a layer with a rule, Δ = 2Y (the gradient of its own ‖Y‖²) goes through the rule; for
any other layer, the per-sample gradient of Σ_calls ‖module(args)‖² with respect to its own
parameters (fallback.module_local). Both describe the module as it ran, forward hooks
included. A verified pass (the same schedule as per_sample: first batch of a pass, and
whenever the layers or their inputs change) keeps the graph of the forward and compares
each rule's Σ_k g_k with autograd's gradient of that layer's Σ‖Y‖²: a rule that does not
describe the layer (a hook that rescales the output, a subclass with another forward) is
replaced by the module's own per-sample gradient, with a warning.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .capture import Site, detached, hooked, parameters_in_use, without_autocast
from .fallback import module_local
from .objective import squared_norm
from .per_sample import AmbiguousSamples, ambiguous_sites
from .state import MODULE_LOCAL, RULE, ImportanceState, agreed, describe
from .verify import mismatch, tolerance
from .. import sharding

Tensor = torch.Tensor


def _rule_values(s: Site, backend: str, signed: bool) -> dict[str, Tensor]:
    doubled = tuple(2 * t.detach() if isinstance(t, Tensor) else None for t in
                    (s.y if isinstance(s.y, tuple) else (s.y,)))  # Δ = 2Y: ∂‖Y‖²/∂Y
    rule = s.rule.signed if signed else s.rule
    with without_autocast(doubled[0].device), torch.no_grad():
        return rule(s.module, s.x, doubled if s.needs_call else s.samples_first(doubled[0]),
                    frozenset(s.params), backend)


def _rule_failure(s: Site, backend: str) -> str | None:
    """Why the rule does not describe the layer's own ‖Y‖² (None when it does)."""
    own = {a: s.module.get_parameter(a) for a in s.params}
    grads = torch.autograd.grad(squared_norm(s.y), list(own.values()), retain_graph=True, allow_unused=True)
    try:
        signed = _rule_values(s, backend, signed=True)
    except RuntimeError as e:
        return f"its rule cannot process the captured tensors ({e})"
    outputs = s.y if isinstance(s.y, tuple) else (s.y,)  # autocast may have lowered Y's precision
    rtol = tolerance([p.dtype for p in own.values()] + [s.x.dtype if isinstance(s.x, Tensor) else torch.float32]
                     + [t.dtype for t in outputs if isinstance(t, Tensor)])
    for (attr, p), g in zip(own.items(), grads):
        why = mismatch(signed.get(attr), g, rtol)
        if why is not None:
            return f"its rule failed verification for {attr}: {why}"
    return None


def _why_not_ruled(s: Site, ruled: bool, missing: frozenset) -> str:
    if ruled:
        return f"its rule does not compute {', '.join(sorted(missing))}"
    if s.unmatched is not None:
        return f"its input {s.unmatched} has no single dimension of the batch's size"
    return f"no exact rule for {type(s.module).__name__} in mode='local'"


def _own_gradients(s: Site, batch: int, used: dict[str, Tensor]) -> dict[str, Tensor]:
    """Σ_k |∂‖Y_k‖²/∂θ| from the module's own per-sample gradient. A module whose inputs are
    all broadcast over the batch (position ids of shape (1, T)) computes the same Y for every
    sample: B times the gradient of that one output. `used`: the tensors the forward used by
    canonical name (FSDP2: a shard is gathered here, after the forward, and cast like them)."""
    calls = detached(s.call_args)
    own = {a: s.module.get_parameter(a) for a in s.params}
    own = {a: sharding.full(p).to(used[s.params[a]].dtype) if sharding.is_sharded(p) else p for a, p in own.items()}
    leaves = [t for t in tree_flatten(calls)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if any(t.shape[0] == batch for t in leaves):
        return module_local(s.module, calls, own, batch)
    if not any(t.shape[0] == 1 for t in leaves):
        raise ValueError(f"mode='local' cannot compute {describe(s.path, s.module)}: none of its inputs "
                         f"{[tuple(t.shape) for t in leaves]} has the batch's {batch} samples (or a single "
                         "broadcast one) in dimension 0; use mode='per_sample'")
    return {a: batch * v for a, v in module_local(s.module, calls, own, 1).items()}


def local_sums(sites: list[Site], forward: Callable[[], Tensor], backend: str, batch: int,
               state: ImportanceState, verify: bool, model: nn.Module,
               params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Σ_k |∂‖Y_k‖²/∂θ| of every site's own parameters (canonical names); records the paths in `state`.

    A ruled layer's rule (and its check) runs in the forward hook, on Y as the layer produced
    it: a later in-place op (ReLU(inplace=True), `out += identity`) would rewrite a kept Y.
    """
    for s in sites:
        if state.levels.get(s.path) is not None:
            s.rule = None
    # per site (by id), from its first call: (why its rule failed the check, or None; rule values)
    from_hook: dict[int, tuple] = {}
    checking = [False]
    used = params

    def on_output(s: Site) -> None:
        why = _rule_failure(s, backend) if checking[0] else None
        from_hook[id(s)] = (why, {} if why else _rule_values(s, backend, signed=False))
        s.x = s.y = None  # used: let the forward free them

    def ruled(s: Site) -> bool:
        return s.rule is not None and s.calls == 1 and id(s) in from_hook

    def run(keep_graph: bool) -> tuple:
        nonlocal used
        checking[0] = keep_graph
        from_hook.clear()
        for s in sites:
            s.release()
            s.calls, s.unmatched, s.ambiguous, s.on_output = 0, None, False, on_output
        try:
            with hooked(sites), torch.set_grad_enabled(keep_graph), parameters_in_use(model, params) as used:
                forward()
        finally:
            for s in sites:
                s.on_output = None
        return tuple((s.path, ruled(s), s.calls) for s in sites if s.calls)

    # a pass's first batch keeps the forward's graph to verify; a later one only when the
    # layers that ran (or how) differ from the verified ones, at the cost of a second forward
    since = state.decisions()
    check = verify and state.verified_on is None
    structure = run(keep_graph=check)
    if agreed(state, since, bool(ambiguous_sites(sites, batch)))[0]:  # sub-batches make the sample dim unique
        raise AmbiguousSamples
    if verify and not check and state.needs_verification(structure):
        check = True
        structure = run(keep_graph=True)
    # a collective pass: a rule that failed its check on any rank leaves every rank's module
    failed = agreed(state, since, failed=[s.path for s in sites if ruled(s) and from_hook[id(s)][0]])[2]
    sums: dict[str, Tensor] = {}
    coverage: dict[str, str] = {}
    for s in sites:
        wanted = frozenset(s.params)
        values, path = {}, RULE if s.rule is not None else MODULE_LOCAL
        if ruled(s):
            why, values = from_hook[id(s)]
            if why is None and s.path in failed:
                why, values = "its rule failed verification on another rank", {}
            if why is not None:
                state.demote(s.path, s.module, MODULE_LOCAL, why)
        if s.calls and set(values) != wanted:  # no rule, or one that does not describe the layer
            if state.levels.get(s.path) is None:
                state.warn(s.path, s.module, _why_not_ruled(s, ruled(s), wanted - set(values)), MODULE_LOCAL)
            values = _own_gradients(s, batch, used)
            path = MODULE_LOCAL
        sums.update({s.params[a]: v for a, v in values.items()})
        coverage.update({n: path for n in s.params.values()})
        s.release()
    if check:
        state.verified_on = structure
    state.record_coverage(coverage)
    return sums


__all__ = ["local_sums"]
