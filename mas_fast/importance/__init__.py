"""Importance of one unlabeled batch: Σ over its samples of |g|, per parameter.

Three modes (see DESIGN.md):
- "per_sample": Σ_k |∂‖F(x_k)‖²/∂θ| — the paper. One forward and one backward with
  capture hooks; per module its exact rule, else the module-local path, else the
  whole-model torch.func fallback, each fast path verified against autograd (per_sample.py).
- "batch": |∂ Σ_k ‖F(x_k)‖²/∂θ| — the authors' code / Avalanche (signs cancel in a batch).
- "local": each layer's own ‖Y‖² as the function (Hebbian variant): Δ = 2·Y through the
  rules, else the module's own per-sample gradient, rules verified too (local_mode.py).

The objective (objective.py) replaces ‖F(x_k)‖² by another output norm, or (batch mode
only) by a library's own loss of the batch output, in train mode if that library does so.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .capture import Site, eval_mode, parameters_in_use
from .local_mode import local_sums
from .objective import NORMS, PAPER, Objective, train_mode
from .per_sample import AmbiguousSamples, per_sample_sums
from .rules import rule_for
from .state import RULE, WHOLE_MODEL, ImportanceState, collective_pass, describe, in_collective_pass
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
    # a collective pass (FSDP2, every rank in step) reports a non-finite output at its end, through
    # the importance it makes non-finite: raised here, it would leave the other ranks waiting
    if not in_collective_pass() and not bool(torch.isfinite(F).all()):
        raise NonFiniteError("the model output contains NaN or Inf; importance was not accumulated")
    return F


def sites_of(model: nn.Module, params: dict[str, Tensor], mode: str, batch: int,
             levels: Optional[dict[str, str]] = None) -> list[Site]:
    """One Site per module holding some of `params` (canonical name → tensor) directly; a rule's
    `claims` (attention's out_proj) fold a child's parameters into its parent's site.

    With `levels` (per_sample mode: module path → demoted path), a module without a rule,
    holding a shared parameter or demoted from its rule gets a module-local site, and one
    demoted to the whole-model fallback a site without either.
    """
    owners: dict[int, int] = {}
    for m in model.modules():
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    # by name: under FSDP2 a module may hold another tensor for the parameter than `params` (the
    # root stays gathered after a forward that no backward followed)
    name_of = {id(p): n for n, p in model.named_parameters() if n in params}
    claimed: set[int] = set()  # children covered by their parent's rule (modules() is pre-order)
    sites = []
    for path, m in model.named_modules():
        if id(m) in claimed:
            continue
        own = {a: name_of[id(p)] for a, p in m.named_parameters(recurse=False) if id(p) in name_of}
        if not own:
            continue
        shared = any(owners[id(m.get_parameter(a))] > 1 for a in own)
        if shared and mode == "local":
            raise ValueError(f"mode='local' is undefined for parameters shared between modules: "
                             f"{', '.join(own.values())} of {describe(path, m)} (a layer's own output "
                             "does not determine a parameter that other layers also use); use "
                             "mode='per_sample'")
        level = (levels or {}).get(path, RULE)
        rule = rule_for(m)
        for child_name in getattr(rule, "claims", ()):
            child = m.get_submodule(child_name)
            claimed.add(id(child))
            own.update({f"{child_name}.{a}": name_of[id(p)] for a, p in child.named_parameters(recurse=False)
                        if id(p) in name_of and owners[id(p)] == 1})
        if shared or level != RULE:
            rule = None
        local = levels is not None and rule is None and level != WHOLE_MODEL
        sites.append(Site(m, own, rule, batch=batch, keep_calls=mode == "local", shared=shared, path=path,
                          local=local))
    return sites


def _zeros(p: Tensor) -> Tensor:
    return torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)


def _add(total: dict[str, Tensor], part: dict[str, Tensor]) -> None:
    for n, v in part.items():
        total[n] = total[n] + v if n in total else v


def _per_sample(model, x, params, output_fn, backend, batch, state: ImportanceState,
                verify: bool, objective: Objective) -> dict[str, Tensor]:
    """Σ_k |g_k| of the objective's part(s) (one per output for norm="vector"), summed."""
    output_of = output_fn or (lambda out: out)
    F = None
    if objective.norm == "vector":  # the number of outputs: one forward without a graph
        with torch.no_grad():
            F = output_tensor(model(x), output_fn, batch)
    parts = objective.parts(F)
    sums: dict[str, Tensor] = {}
    for part in parts:
        _add(sums, per_sample_sums(
            model, x, params, lambda: sites_of(model, params, "per_sample", batch, state.levels),
            lambda: part(output_tensor(model(x), output_fn, batch)),
            lambda out: part(output_of(out)), backend, batch, state, verify))
    return sums


def _halves(x: Any, batch: int) -> list[tuple[Any, int]]:
    """`x` as sub-batches of ⌈B/2⌉ and ⌊B/2⌋ samples: every tensor leaf whose dimension 0 has the
    batch's size is split, the other leaves (shared tables, broadcast ids) go to both."""
    def part(rows: slice) -> Any:
        return tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else t, x)
    half = (batch + 1) // 2
    return [(part(slice(0, half)), half), (part(slice(half, batch)), batch - half)]


def _over_sub_batches(sums_of: Callable[[Any, int], dict[str, Tensor]], x: Any, batch: int) -> dict[str, Tensor]:
    """`sums_of(x, batch)`, or, where a layer cannot tell its samples apart (a dimension other than
    the samples' has the batch's size), the sum over two smaller sub-batches, split again as long
    as needed (a single sample is never ambiguous). Exact: Σ_k |g_k| is a sum over samples."""
    try:
        return sums_of(x, batch)
    except AmbiguousSamples:
        sums: dict[str, Tensor] = {}
        for part, size in _halves(x, batch):
            if size:
                _add(sums, _over_sub_batches(sums_of, part, size))
            else:  # one sample, split because another rank's batch was ambiguous: run in step, count once
                _over_sub_batches(sums_of, x, batch)
        return sums


def _batch(model, x, params, output_fn, batch, state: ImportanceState, objective: Objective) -> dict[str, Tensor]:
    """|∇ part(F)| of the batch output F, summed over the objective's parts (one forward)."""
    state.record_coverage({n: "batch" for n in params})
    sums: dict[str, Tensor] = {}
    with torch.enable_grad():
        with parameters_in_use(model, params) as used:  # FSDP2: the gathered parameters
            F = output_tensor(model(x), output_fn, batch)
        parts = objective.parts(F)
        for i, part in enumerate(parts):
            total = part(F)
            if not total.requires_grad:
                return {}
            grads = torch.autograd.grad(total, [used[n] for n in params], allow_unused=True,
                                        retain_graph=i + 1 < len(parts))
            _add(sums, {n: g.to(acc_dtype(g.dtype)).abs() for n, g in zip(params, grads) if g is not None})
    return sums


def _check_objective(mode: str, objective: Objective) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a mas_fast.importance.Objective, got {type(objective).__name__}")
    if mode != "batch" and not objective.per_sample_form:
        raise ValueError(f"mode={mode!r} needs a per-sample objective (Σ_k f(F_k) in eval mode); this objective "
                         "is a batch loss or runs in train mode: use mode='batch'")
    if mode == "local" and objective.norm != "l2":
        raise ValueError(f"mode='local' takes each layer's own squared L2 norm; norm={objective.norm!r} "
                         "applies to mode='per_sample' or 'batch'")


def _outside_inference_mode(x: Any, params: dict[str, Tensor]) -> Any:
    """`x` usable by autograd: inference tensors (made under torch.inference_mode) are copied
    into normal ones. Parameters that are inference tensors cannot be differentiated at all."""
    frozen = [n for n, p in params.items() if p.is_inference()]
    if frozen:
        raise TypeError(f"parameters {frozen} were created under torch.inference_mode() and cannot be "
                        "differentiated; create the model outside inference mode")
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t, x)


def batch_importance(model: nn.Module, x: Any, params: dict[str, Tensor], mode: str,
                     output_fn: OutputFn = None, backend: str = "auto", verify: bool = True,
                     state: Optional[ImportanceState] = None,
                     objective: Objective = PAPER, collective: bool = False) -> tuple[dict[str, Tensor], int]:
    """Σ over the samples of `x` of |g| for every parameter in `params`, and the sample count.

    Runs in eval mode (train mode for a train-mode objective; each module's mode restored),
    never touches `.grad`, and works under torch.no_grad() and torch.inference_mode() (it
    enables what the pass needs). Every returned tensor is float32 (float64 for float64 parameters) and finite, else
    NonFiniteError is raised.

    `verify` (per_sample mode): check each rule and module-local path against autograd's
    batch gradient on the first batch of `state`'s pass (see per_sample.py); `state` carries
    demotions, warnings and coverage between batches (a fresh one when None).

    `objective` (objective.py): the output norm, or a batch loss (mode="batch" only, where
    the result is |∇ loss| of the batch), and whether the pass runs in train mode.

    `params` may be FSDP2 shards (DTensors): FSDP gathers each group while it runs, the rules see
    whole parameters, and the sums are whole-size. `collective`: every rank runs this pass in step
    (FSDP2 under several ranks); a non-finite output is then reported at the end of the pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_objective(mode, objective)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    batch = batch_size(x)
    if batch == 0:
        raise ValueError("the input batch is empty (0 samples)")
    state = state if state is not None else ImportanceState()
    with collective_pass(collective):
        return _checked(_importance(model, x, params, mode, output_fn, backend, verify, state, objective, batch),
                        params, batch)


def _importance(model, x, params, mode, output_fn, backend, verify, state, objective, batch) -> dict[str, Tensor]:
    with torch.inference_mode(False), (train_mode if objective.train else eval_mode)(model):
        x = _outside_inference_mode(x, params)
        if mode == "per_sample":
            sums = _over_sub_batches(lambda x, batch: _per_sample(model, x, params, output_fn, backend, batch, state,
                                                                  verify, objective), x, batch)
        elif mode == "batch":  # |Σ_k g_k| of a batch is not a sum over sub-batches: never split
            sums = _batch(model, x, params, output_fn, batch, state, objective)
        else:
            sums = _over_sub_batches(lambda x, batch: local_sums(
                sites_of(model, params, "local", batch), lambda: output_tensor(model(x), output_fn, batch), backend,
                batch, state, verify, model, params), x, batch)
    return sums


def _checked(sums: dict[str, Tensor], params: dict[str, Tensor], batch: int) -> tuple[dict[str, Tensor], int]:
    """Every parameter's sum (zeros where the objective does not depend on it), all finite."""
    result = {n: sums[n] if n in sums else _zeros(p) for n, p in params.items()}
    peaks = [v.amax() for v in result.values() if v.numel()]
    if peaks and not bool(torch.isfinite(torch.stack([p.to(torch.float64) for p in peaks])).all()):
        bad = [n for n, v in result.items() if v.numel() and not bool(torch.isfinite(v).all())]
        raise NonFiniteError(f"importance is NaN or Inf for {', '.join(bad)} (gradients overflowed); "
                             "nothing was accumulated")
    return result, batch


__all__ = ["MODES", "NORMS", "ImportanceState", "NonFiniteError", "Objective", "batch_importance", "batch_size",
           "output_tensor", "sites_of"]
