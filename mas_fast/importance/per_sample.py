"""Per-sample importance (the paper's Ω) of one batch, through the cascade of exact paths.

Each module holding trainable parameters is served by the fastest path that describes it:

1. its rule (closed form on the captured input X and output gradient Δ);
2. the module-local path (the per-sample VJP of that module alone, local_vjp.py) for
   a module without a rule, called several times, or holding a shared parameter (and
   per-sample proxies for parameters a container uses with a leading dimension of 1,
   proxies.py);
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

from .capture import Site, parameters_in_use, run_and_stream
from .fallback import model_per_sample
from .local_vjp import group_sums, groups
from .proxies import Proxy, proxies_for, proxy_sums, substituted
from .state import MODULE_LOCAL, RULE, WHOLE_MODEL, ImportanceState, agreed
from .verify import mismatch, tolerance
from .. import sharding

Tensor = torch.Tensor


class _Demoted(Exception):
    """A module was demoted after the forward or the check: compute the batch again."""


class AmbiguousSamples(Exception):
    """A layer's input has several dimensions of the batch's size (T == B): the batch is computed
    again as smaller sub-batches (importance is a sum over samples), not by the whole-model path."""


def ambiguous_sites(sites: list[Site], batch: int) -> list[Site]:
    """The sites whose sample dimension a smaller batch would make unique."""
    return [s for s in sites if s.ambiguous] if batch > 1 else []


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
    builds the sites according to `state.levels`. Records the paths in `state`. `verify=False`
    trusts every rule and module-local path (no check, no parameter gradients).
    """
    while True:
        sites = sites_for()
        for s in sites:
            s.may_expand = s.path not in state.no_expand
        batch_pass = _BatchPass(model, x, params, sites, objective, of_output, backend, batch, state, verify)
        try:
            return batch_pass.run()
        except _Demoted:
            continue
        except AmbiguousSamples:
            raise
        except Exception as e:  # noqa: BLE001 — retried without the substitutions, else raised
            expanded = [s for s in sites if s.expanded]
            if not (expanded or batch_pass.proxies):
                raise
            _refuse_substitutions(expanded, batch_pass.proxies, state, f"the forward failed with it ({e!r})")
        finally:
            for s in sites:
                s.release()


def _refuse_substitutions(expanded: list[Site], proxies: list[Proxy], state: ImportanceState, why: str) -> None:
    """Never again expand these outputs or use these proxies (for the instance), and say why."""
    for s in expanded:
        state.no_expand.add(s.path)
        state.warn(s.path, s.module, f"its output expanded to the batch: {why}", WHOLE_MODEL)
    for p in proxies:
        state.no_proxy.add(p.name)
        state.warn(p.site.path, p.site.module, f"a per-sample proxy for {p.attr}: {why}", MODULE_LOCAL)


class _BatchPass:
    """One forward and backward over a batch with a fixed assignment of paths to modules."""

    def __init__(self, model, x, params, sites, objective, of_output, backend, batch, state, verify) -> None:
        self.model, self.x, self.params, self.of_output = model, x, params, of_output
        self.backend, self.batch, self.state, self.verify = backend, batch, state, verify
        self.plain_objective = objective
        # Under FSDP2 the gathered parameters take the place of proxies (FSDP's pre-forward
        # registers them over any stand-in): module-local sites only.
        self.sharded = any(sharding.is_sharded(p) for p in params.values())
        self.proxies = [] if self.sharded else proxies_for(sites, params, batch, state.proxy_ok, state.no_proxy, verify)
        self.used = params                      # the tensors the forward used (FSDP2: gathered)
        self.checking = [p for p in self.proxies if p.checking]
        self.sites = [s for s in sites if s.params]  # containers whose parameters all have proxies
        self.since = state.decisions()          # the ranks of a collective pass agree on changes
        self.sums: dict[str, Tensor] = {}
        self.signed: dict[str, Tensor] = {}     # Σ_k g_k, on a verified batch
        self.crashed: list[tuple[Site, str]] = []
        # decided after the forward, before the backward:
        self.verifying, self.autocast, self.structure = False, [], ()
        self.ruled: list[Site] = []             # sites their rule serves (captures go with the backward)

    def objective(self) -> Tensor:
        with substituted(self.proxies), parameters_in_use(self.model, self.params) as self.used:
            return self.plain_objective()

    def whole(self, names: list[str]) -> dict[str, Tensor]:
        """The named parameters' values as the forward used them, outside FSDP2's gathering: a
        shard is gathered (a collective each) and cast as FSDP cast it."""
        return {n: sharding.full(self.params[n]).to(self.used[n].dtype) if sharding.is_sharded(self.params[n])
                else self.used[n] for n in names}

    def apply_rule(self, site: Site, delta: Any) -> None:
        """The rule on the site's captured input and Δ (and its signed twin on a verified batch)."""
        wanted = frozenset(site.params)
        try:
            both = getattr(site.rule, "with_signed", None)  # one computation for both (attention's VJP)
            if self.verifying and both is not None:
                values, signed = both(site.module, site.x, delta, wanted, self.backend)
            else:
                values = site.rule(site.module, site.x, delta, wanted, self.backend)
                signed = site.rule.signed(site.module, site.x, delta, wanted, self.backend) if self.verifying else {}
        except RuntimeError as e:  # shapes the rule did not expect: it does not describe this layer
            self.crashed.append((site, f"its rule cannot process the captured tensors ({e})"))
            return
        self.sums.update({site.params[attr]: v for attr, v in values.items()})
        self.signed.update({site.params[attr]: v for attr, v in signed.items()})

    def wanted(self, total: Tensor) -> dict[str, Tensor]:
        """After the forward: settle the checks, and name the tensors whose gradients the backward returns."""
        state, sites = self.state, self.sites
        called = [s for s in sites if s.rule is not None and s.calls > 1]
        for s in called:  # a ruled module called several times: its calls need the module-local path
            state.demote(s.path, s.module, MODULE_LOCAL, f"called {s.calls} times in one forward")
        ambiguous = not called and bool(ambiguous_sites(sites, self.batch))  # before any backward
        refused = False
        if not (called or ambiguous):
            self.structure = _structure(sites)
            self.verifying = self.verify and state.needs_verification(self.structure)
            expanded = [s for s in sites if s.expanded]
            try:
                if (expanded and self.verifying) or self.checking:
                    _check_substitutions(expanded, self.checking, self.plain_objective, total, state)
            except _Demoted:
                refused = True
        ambiguous, changed, _ = agreed(state, self.since, ambiguous)
        if changed or refused:
            raise _Demoted
        if ambiguous:
            raise AmbiguousSamples
        self.ruled = [s for s in sites if s.ruled]
        self.autocast = _autocast_dtypes()
        served = [s for s in sites if s.ruled or _usable_locally(s)]
        names = [n for s in sites if not (s.ruled or _usable_locally(s)) for n in s.params.values()]
        if self.verifying:
            names += [n for s in served for n in s.params.values()]
        return {**{n: self.used[n] for n in dict.fromkeys(names)},
                **{f"proxy {p.name}": p.tensor for p in self.proxies}}

    def run(self) -> dict[str, Tensor]:
        state = self.state
        grads = run_and_stream(self.sites, self.objective, self.apply_rule, self.wanted)
        for site, reason in self.crashed:
            state.demote(site.path, site.module, MODULE_LOCAL, reason)
        if agreed(state, self.since)[1]:
            raise _Demoted
        from_proxies = self._proxy_sums(grads)
        coverage = {n: RULE for s in self.sites if s.rule is not None for n in s.params.values()}
        coverage.update({p.name: RULE for p in self.proxies if not p.checking})
        whole = self._module_local(coverage)
        for p in self.checking:
            _check_proxy(p, from_proxies[p.name], self.sums.get(p.name), state)
        if self.verifying:
            _verify(self.ruled, [s for s in self.sites if _usable_locally(s)], self.params, self.signed, grads,
                    self.autocast, state)
            if agreed(state, self.since)[1]:
                raise _Demoted
            state.verified_on = self.structure
        used = {n: s for n, s in whole.items() if grads.get(n) is not None}
        for s in {id(s): s for s in used.values()}.values():
            if state.levels.get(s.path) != WHOLE_MODEL:  # a demotion was reported when it happened
                state.warn(s.path, s.module, _whole_model_reason(s), WHOLE_MODEL)
        if used:  # FSDP2: the whole model gathered for this moment (the fallback runs all of it per sample)
            with sharding.model_unsharded(self.model):
                live = dict(self.model.named_parameters())
                self.sums.update(model_per_sample(self.model, self.x, {n: live[n] for n in used},
                                                  lambda out, _: self.of_output(out), self.batch))
        coverage.update({n: WHOLE_MODEL for n in whole if n in used or n not in coverage})
        state.record_coverage(coverage)
        return self.sums

    def _proxy_sums(self, grads: dict) -> dict[str, Tensor]:
        """Σ_k |g_k| of each proxied parameter (into the sums once the proxy is accepted; on its
        checking batch the proxy's batch gradient stands for autograd's gradient of the parameter)."""
        out = {}
        for p in self.proxies:
            out[p.name], signed = proxy_sums(p, grads.pop(f"proxy {p.name}"))
            if p.checking:
                grads[p.name] = signed
            else:
                self.sums[p.name], self.signed[p.name] = out[p.name], signed
        return out

    def _module_local(self, coverage: dict[str, str]) -> dict[str, Site]:
        """Σ_k |g_k| of the module-local groups; returns the parameters (→ site) no path above serves."""
        whole: dict[str, Site] = {}
        for group in groups([s for s in self.sites if s.local]):
            usable = [s for s in group if _usable_locally(s)]
            covered = {n for s in usable for n in s.params.values()}
            # an uncalled holder of a shared parameter is served by the holders that call it
            if not usable or not all(_usable_locally(s) or (s.calls == 0 and set(s.params.values()) <= covered)
                                     for s in group):
                whole.update({n: s for s in group for n in s.params.values()})
                continue
            delivered = [s for s in usable if any(d is not None for _, deltas in s.local_calls for d in deltas)]
            if delivered:
                demoted = any(self.state.levels.get(s.path) is not None for s in group)
                values = self.whole([n for s in delivered for n in s.params.values()])
                self.sums.update(group_sums(delivered, values, self.batch,
                                            self.signed if self.verifying else None, closed_form=not demoted))
            for s in delivered:
                if self.state.levels.get(s.path) is None:  # demotions were reported when they happened
                    self.state.warn(s.path, s.module, "it holds a parameter shared with another module" if s.shared
                                    else f"no exact rule for {type(s.module).__name__}", MODULE_LOCAL)
            coverage.update({n: MODULE_LOCAL for s in group for n in s.params.values()})
        ruled = {id(s) for s in self.ruled}
        for s in self.sites:
            if not s.local and id(s) not in ruled:
                whole.update({n: s for n in s.params.values()})
        return whole


def _check_substitutions(expanded: list[Site], checking: list[Proxy], objective: Callable[[], Tensor],
                         total: Tensor, state: ImportanceState) -> None:
    """Outputs expanded to the batch and proxies in place of parameters must leave the objective
    as a plain forward computes it (they do when only broadcast against batched tensors)."""
    with torch.no_grad():
        plain = objective()
    rtol = tolerance([total.dtype])
    if (plain - total.detach()).abs().item() <= rtol * max(plain.abs().item(), total.abs().item()):
        return
    _refuse_substitutions(expanded, checking, state, "it changes the model's output")
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
    """Demote every site whose Σ_k g_k disagrees with autograd (the caller then computes the batch again)."""
    local_groups = groups(local)
    for s in ruled + local:
        rtol = _rtol(s, params, grads, autocast)
        for attr, n in s.params.items():
            why = mismatch(signed.get(n), grads.get(n), rtol)
            if why is None:
                continue
            if any(s is r for r in ruled):
                state.demote(s.path, s.module, MODULE_LOCAL, f"its rule failed verification for {attr}: {why}")
            else:
                group = next(g for g in local_groups if any(s is t for t in g))
                for t in group:
                    state.demote(t.path, t.module, WHOLE_MODEL,
                                 f"its module-local path failed verification for {attr}: {why} (the "
                                 "parameter is used outside the module's own forward)")
            break


__all__ = ["AmbiguousSamples", "ambiguous_sites", "per_sample_sums"]
