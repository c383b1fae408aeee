"""Per-sample importance (the paper's Ω) of one batch, through the cascade of exact paths.

Each module holding trainable parameters is served by the fastest path that describes it:

1. its rule (closed form on the captured input X and output gradient Δ);
2. the module-local path (the per-sample VJP of that module alone, module_local.py) for
   a module without a rule, called several times, or holding a shared parameter;
3. the whole-model torch.func fallback, when nothing above can serve.

When the pass is verified (ImportanceState.needs_verification), the backward also returns
autograd's gradients of the parameters of paths 1 and 2, and every site's Σ_k g_k is
compared with them (verify.py). A mismatch demotes the module one step, with a warning,
and the batch is computed again: the cost of a demotion is paid once per instance.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .capture import Site, run_and_stream
from .fallback import model_per_sample
from .local_vjp import group_sums, groups
from .proxies import Proxy, proxies_for, proxy_sums, substituted
from .state import MODULE_LOCAL, RULE, WHOLE_MODEL, ImportanceState
from .verify import mismatch, tolerance

Tensor = torch.Tensor


class _Demoted(Exception):
    """A module was demoted after the forward or the check: compute the batch again."""


def _structure(sites: list[Site]) -> tuple:
    """What verification depends on: which modules ran, how, on inputs of which rank and dtype."""
    def signature(s: Site) -> tuple:
        x = s.x if isinstance(s.x, Tensor) else None
        return (s.path, bool(s.ruled), s.local, s.calls, None if x is None else (x.dim(), x.dtype))
    return tuple(signature(s) for s in sites if s.calls)


def _autocast_dtypes() -> list[torch.dtype]:
    """The dtypes an ambient torch.autocast runs the forward in (none when it is off)."""
    return [torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


def _rtol(site: Site, params: dict[str, Tensor], grads: dict[str, Any], autocast: list) -> float:
    dtypes = [params[n].dtype for n in site.params.values()]
    dtypes += [g.dtype for n in site.params.values() if (g := grads.get(n)) is not None]
    return tolerance(dtypes + autocast)


def _usable_locally(site: Site) -> bool:
    return site.local and site.calls > 0 and site.unbatched is None


def _whole_model_reason(site: Site) -> str:
    kind = type(site.module).__name__
    if site.unmatched is not None:
        return (f"{kind}'s input {site.unmatched} has no single dimension of the batch's size to index "
                "the samples (flattened, or seq-first with T == B)")
    if site.unbatched is not None:
        return (f"its outputs {', '.join(map(str, site.unbatched))} do not have the batch's samples in "
                "dimension 0")
    return "its parameters are used outside its own forward"


def per_sample_sums(model: nn.Module, x: Any, params: dict[str, Tensor], sites_for: Callable[[], list[Site]],
                    objective: Callable[[], Tensor], of_output: Callable[[Any], Tensor], backend: str,
                    batch: int, state: ImportanceState, verify: bool = True) -> dict[str, Tensor]:
    """Σ_k |g_k| for every parameter of `params` that the objective depends on (canonical names).

    `objective()` runs the model on the batch and returns Σ_k ‖F(x_k)‖²; `of_output(out)` is
    the same objective from a model output (for the whole-model fallback); `sites_for()`
    builds the sites according to `state.levels`. Fills `state.coverage`. `verify=False`
    trusts every rule and module-local path (no check, no parameter gradients).
    """
    while True:
        sites = sites_for()
        for s in sites:
            s.may_expand = s.path not in state.no_expand
        try:
            return _one_pass(model, x, params, sites, objective, of_output, backend, batch, state, verify)
        except _Demoted:
            continue
        except Exception as e:  # noqa: BLE001 — retried once without the expansions, else raised
            expanded = [s for s in sites if s.expanded]
            if not expanded:
                raise
            _no_expansion(expanded, state, f"the forward failed with its output expanded to the batch ({e!r})")
        finally:
            for s in sites:
                s.release()


def _no_expansion(sites: list[Site], state: ImportanceState, reason: str) -> None:
    for s in sites:
        state.no_expand.add(s.path)
        state.warn(s.path, s.module, reason, WHOLE_MODEL)


def _one_pass(model, x, params, sites, objective, of_output, backend, batch, state, verify) -> dict[str, Tensor]:
    proxies = proxies_for(sites, params, batch, state.proxy_ok, state.no_proxy, verify)
    sites = [s for s in sites if s.params]  # containers whose parameters all have proxies
    checking = [p for p in proxies if p.checking]
    plain_objective = objective

    def objective() -> Tensor:
        with substituted(proxies):
            return plain_objective()

    sums: dict[str, Tensor] = {}
    signed: dict[str, Tensor] = {}
    check = {"now": False, "autocast": [], "structure": (), "ruled": set()}

    crashed: dict[int, tuple[Site, str]] = {}

    def apply_rule(site: Site, delta: Any) -> None:
        wanted = frozenset(site.params)
        try:
            values = site.rule(site.module, site.x, delta, wanted, backend)
            values_signed = site.rule.signed(site.module, site.x, delta, wanted, backend) if check["now"] else {}
        except RuntimeError as e:  # shapes the rule did not expect: it does not describe this layer
            crashed[id(site)] = (site, f"its rule cannot process the captured tensors ({e})")
            return
        sums.update({site.params[attr]: v for attr, v in values.items()})
        signed.update({site.params[attr]: v for attr, v in values_signed.items()})

    def wanted(total: Tensor) -> dict[str, Tensor]:
        for s in sites:  # a ruled module called several times: its calls need the module-local path
            if s.rule is not None and s.calls > 1:
                state.demote(s.path, s.module, MODULE_LOCAL, f"called {s.calls} times in one forward")
                raise _Demoted
        expanded = [s for s in sites if s.expanded]
        if (expanded and verify and state.needs_verification(_structure(sites))) or checking:
            _check_substitutions(expanded, checking, plain_objective, total, state)
        check["structure"] = _structure(sites)
        check["ruled"] = {id(s) for s in sites if s.ruled}  # captures are released by the backward
        check["now"] = verify and state.needs_verification(check["structure"])
        check["autocast"] = _autocast_dtypes()
        names = [n for s in sites if not (s.ruled or _usable_locally(s)) for n in s.params.values()]
        if check["now"]:
            names += [n for s in sites if s.ruled or _usable_locally(s) for n in s.params.values()]
        return {**{n: params[n] for n in dict.fromkeys(names)}, **{f"proxy {p.name}": p.tensor for p in proxies}}

    grads = run_and_stream(sites, objective, apply_rule, wanted)
    proxied = {p.name: proxy_sums(p, grads.pop(f"proxy {p.name}")) for p in proxies}
    for p in proxies:
        if p.checking:  # the proxy's batch gradient is autograd's gradient of the parameter
            grads[p.name] = proxied[p.name][1]
        else:
            sums[p.name], signed[p.name] = proxied[p.name]
    for site, reason in crashed.values():
        state.demote(site.path, site.module, MODULE_LOCAL, reason)
    if crashed:
        raise _Demoted
    ruled = [s for s in sites if id(s) in check["ruled"]]
    coverage = {n: RULE for s in sites if s.rule is not None for n in s.params.values()}
    coverage.update({p.name: RULE for p in proxies if not p.checking})
    whole: dict[str, Site] = {}
    for group in groups([s for s in sites if s.local]):
        names = {n for s in group for n in s.params.values()}
        usable = [s for s in group if _usable_locally(s)]
        covered = {n for s in usable for n in s.params.values()}
        # an uncalled holder of a shared parameter is served by the holders that call it
        if usable and all(_usable_locally(s) or (s.calls == 0 and set(s.params.values()) <= covered) for s in group):
            delivered = [s for s in usable if any(d is not None for _, deltas in s.local_calls for d in deltas)]
            if delivered:
                sums.update(group_sums(delivered, params, batch, signed))
            for s in delivered:
                if state.levels.get(s.path) is None:  # demotions were reported when they happened
                    state.warn(s.path, s.module, "it holds a parameter shared with another module" if s.shared
                               else f"no exact rule for {type(s.module).__name__}", MODULE_LOCAL)
            coverage.update({n: MODULE_LOCAL for n in names})
        else:
            whole.update({n: s for s in group for n in s.params.values()})
    for s in sites:
        if not s.local and id(s) not in check["ruled"]:
            whole.update({n: s for n in s.params.values()})
    for p in checking:
        _check_proxy(p, proxied[p.name][0], sums.get(p.name), state)
    if check["now"]:
        _verify(ruled, [s for s in sites if _usable_locally(s)], params, signed, grads, check["autocast"], state)
        state.verified_on = check["structure"]
    used = {n: s for n, s in whole.items() if grads.get(n) is not None}
    for n, s in used.items():
        if state.levels.get(s.path) != WHOLE_MODEL:  # a demotion was reported when it happened
            state.warn(s.path, s.module, _whole_model_reason(s), WHOLE_MODEL)
    if used:
        sums.update(model_per_sample(model, x, {n: params[n] for n in used},
                                     lambda out, _: of_output(out), batch))
    coverage.update({n: WHOLE_MODEL for n in whole if n in used or n not in coverage})
    state.coverage = coverage
    return sums


def _check_substitutions(expanded: list[Site], checking: list[Proxy], objective: Callable[[], Tensor],
                         total: Tensor, state: ImportanceState) -> None:
    """Outputs expanded to the batch and proxies in place of parameters must leave the objective
    as a plain forward computes it (they do when only broadcast against batched tensors)."""
    with torch.no_grad():
        plain = objective()
    rtol = tolerance([total.dtype])
    if (plain - total.detach()).abs().item() <= rtol * max(plain.abs().item(), total.abs().item()):
        return
    if expanded:
        _no_expansion(expanded, state, f"expanding its output {'' if len(expanded) == 1 else '(or another one) '}"
                                       "to the batch changes the model's output")
    for p in checking:
        state.no_proxy.add(p.name)
        state.warn(p.site.path, p.site.module, f"a per-sample proxy for {p.attr} changes the model's output",
                   MODULE_LOCAL)
    raise _Demoted


def _check_proxy(p: Proxy, from_proxy: Tensor, exact: Optional[Tensor], state: ImportanceState) -> None:
    """Accept a proxy for the instance when its Σ_k |g_k| equals the module-local path's."""
    exact = exact if exact is not None else torch.zeros_like(from_proxy)
    if mismatch(from_proxy, exact, tolerance([p.tensor.dtype])) is None:
        state.proxy_ok.add(p.name)
    else:
        state.no_proxy.add(p.name)
        state.warn(p.site.path, p.site.module, f"a per-sample proxy for {p.attr} does not give each sample's "
                   "gradient (its rows are not used one per sample)", MODULE_LOCAL)


def _verify(ruled: list[Site], local: list[Site], params: dict[str, Tensor], signed: dict[str, Tensor],
            grads: dict, autocast: list, state: ImportanceState) -> None:
    """Demote every site whose Σ_k g_k disagrees with autograd (then compute the batch again)."""
    failed = False
    local_groups = groups(local)
    for s in ruled + local:
        rtol = _rtol(s, params, grads, autocast)
        for attr, n in s.params.items():
            why = mismatch(signed.get(n), grads.get(n), rtol)
            if why is None:
                continue
            failed = True
            if any(s is r for r in ruled):
                state.demote(s.path, s.module, MODULE_LOCAL, f"its rule failed verification for {attr}: {why}")
            else:
                group = next(g for g in local_groups if any(s is t for t in g))
                for t in group:
                    state.demote(t.path, t.module, WHOLE_MODEL,
                                 f"its module-local path failed verification for {attr}: {why} (the "
                                 "parameter is used outside the module's own forward)")
            break
    if failed:
        raise _Demoted


__all__ = ["per_sample_sums"]
