"""class MAS: accumulate importance, consolidate tasks, penalise change.

State (all per parameter name, float32 — float64 for float64 parameters):
- the running mean Ω of the current task (Kahan-compensated) and its sample count;
- the consolidated Ω of all past tasks and θ*, the parameters at the last consolidation
  (with `state_dtype=torch.bfloat16`: Ω in bfloat16, θ* in the parameter's dtype).
Every public method validates first and mutates last, so a failure leaves the state as it was.
"""
from __future__ import annotations

import copy
import functools
import math
import threading
import weakref
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from . import ops
from .conventions import MERGES, convention as convention_named
from .importance import ImportanceState, batch_importance
from . import distributed, sharding
from .ops.policy import acc_dtype

Tensor = torch.Tensor
STATE_FORMAT = "mas_fast.MAS/2"
# Per-parameter tensor groups of a state_dict: consolidated Ω and θ*, the running task's Ω
# and its Kahan compensation.
STATE_GROUPS = ("omega", "theta_star", "task_mean", "task_compensation")
# Format 1 differs only in one key's name.
_FORMAT_1 = ("mas_fast.MAS/1", {"task_comp": "task_compensation"})
# Wrappers whose parameter names carry a prefix: DDP / DataParallel (`module.`) and
# torch.compile's OptimizedModule (`_orig_mod.`).
_WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod"}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers, at
    any depth (names without `module.` or `_orig_mod.`)."""
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, _WRAPPERS[type(model).__name__], None),
                                                          nn.Module):
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def check_lambda(lambda_: float) -> None:
    """ValueError unless λ is a finite number >= 0."""
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_) \
            or lambda_ < 0:
        raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")


def check_alpha(alpha: float) -> None:
    """ValueError unless α is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")


def _check_config(lambda_: float, mode: Optional[str], merge: Optional[str], alpha: float,
                  convention: str = "paper", norm: Optional[str] = None) -> tuple[str, str, str]:
    """Checks the configuration; returns (mode, norm, merge) with the convention's defaults filled in."""
    check_lambda(lambda_)
    if not isinstance(convention, str):
        raise TypeError(f"convention must be a str, got {type(convention).__name__}")
    resolved = convention_named(convention).resolve(mode, norm, merge)
    check_alpha(alpha)
    return resolved


STATE_DTYPES = (None, torch.bfloat16)


def _check_state_dtype(state_dtype: Optional[torch.dtype]) -> None:
    """ValueError unless `state_dtype` is a supported setting (every backend runs each)."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")


def _check_usable(backend: str) -> str:
    """An explicit backend must be able to run here: fail at construction, not mid-training."""
    why = ops.backend_status()[ops.check_backend(backend)] if backend != "auto" else None
    if why:
        raise ops.BackendUnavailable(f"backend {backend!r} cannot run here: {why}")
    return backend


def _check_loader(loader: Iterable) -> None:
    if isinstance(loader, Tensor):  # iterating it would feed single samples without a batch dim
        raise TypeError("loader must yield batches; got a tensor: pass [x] (one batch) or call "
                        "accumulate(x)")
    if not (hasattr(type(loader), "__iter__") or hasattr(type(loader), "__getitem__")):
        raise TypeError(f"loader must be an iterable of batches, got {type(loader).__name__}")


def _corrupt_values(state: Mapping[str, Any]) -> list[str]:
    """Values no MAS produces: negative counts, non-finite tensors, negative importance."""
    problems = [f"{k} = {state[k]!r} is not a count >= 0" for k in ("task_count", "num_tasks")
                if isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0]
    for group in STATE_GROUPS:
        for n, t in state[group].items():
            t = sharding.local(t)  # a DTensor: this rank checks its shard (no collective)
            if not bool(torch.isfinite(t).all()):
                problems.append(f"{group}[{n}] is not finite")
            elif group in ("omega", "task_mean") and bool((t < 0).any()):
                problems.append(f"{group}[{n}] holds negative importance")
    return problems


def _shape_changes(stored: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> list[str]:
    """'name: stored shape (…) != model shape (…)' for stored tensors whose parameter changed shape."""
    return [f"{n}: stored shape {tuple(t.shape)} != model shape {tuple(params[n].shape)}"
            for n, t in stored.items() if n in params and t.shape != params[n].shape]


def batch_input(batch: Any) -> Any:
    """A loader batch's model input: the first element of a tuple/list (labels ignored)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("the loader yielded an empty tuple/list; expected (inputs, ...)")
        return batch[0]
    return batch


def _as_model_name(name: str, named: Mapping[str, Tensor]) -> str:
    """A stored name as the model spells it: wrapper prefixes (`module.`, `_orig_mod.`, in any
    nesting) are dropped when only the name without them exists in the model."""
    bare = name
    while bare not in named and bare.startswith(tuple(f"{p}." for p in set(_WRAPPERS.values()))):
        bare = bare.split(".", 1)[1]
    return bare if bare in named else name


def _upgraded(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A format-1 state with its keys renamed to the current format's (others unchanged)."""
    old_format, renames = _FORMAT_1
    if not isinstance(state, Mapping) or state.get("format") != old_format:
        return state
    return {**{renames.get(k, k): v for k, v in state.items()}, "format": STATE_FORMAT}


def _normal_tensors(method: Callable) -> Callable:
    """Run `method` outside torch.inference_mode(): the state it creates (Ω, θ*, running
    means) must be normal tensors, usable later by the penalty's autograd graph."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)
    return wrapper


class _TaskImportance:
    """Running mean of Σ|g| per sample for the current task, with Kahan compensation.

    `exported` marks tensors handed out by `MAS.state_dict()`: the next update works on
    copies (copy on write), so a snapshot never changes and one that is never followed by an
    update costs nothing.
    """

    def __init__(self) -> None:
        self.mean: dict[str, Tensor] = {}
        self.compensation: dict[str, Tensor] = {}
        self.count = 0
        self.exported = False

    def copy(self) -> "_TaskImportance":
        other = _TaskImportance()
        other.mean = {n: t.clone() for n, t in self.mean.items()}
        other.compensation = {n: t.clone() for n, t in self.compensation.items()}
        other.count = self.count
        return other

    def add(self, sums: dict[str, Tensor], n: int, backend: str) -> None:
        if self.exported:  # the snapshot holds its own dicts: replace the tensors in ours
            for group in (self.mean, self.compensation):
                group.update({k: t.clone() for k, t in group.items()})
            self.exported = False
        new = {k: (torch.zeros_like(s), torch.zeros_like(s)) for k, s in sums.items() if k not in self.mean}
        names = list(sums)
        means = [self.mean[k] if k in self.mean else new[k][0] for k in names]
        compensations = [self.compensation[k] if k in self.compensation else new[k][1] for k in names]
        ops.running_mean_update_(*(sharding.locals_of(ts) for ts in (means, compensations, [sums[k] for k in names])),
                                 self.count, n, backend=backend)
        for k, (m, c) in new.items():  # entries join only once the update succeeded
            self.mean[k], self.compensation[k] = m, c
        self.count += n


# A rank's report at each step of a lockstep pass (MAS._lockstep_pass, sharding.exchange): it has a
# batch, its batches ran out, it never had one, it failed; after a step's pass: it succeeded.
_HAS_BATCH, _DONE, _EMPTY, _FAILED, _OK = range(5)

# Models with an importance pass running (hooks installed, eval mode): a second concurrent
# pass on the same model, from another thread, would corrupt both.
_models_in_a_pass: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_models_lock = threading.Lock()


@contextmanager
def _exclusive_pass(model: nn.Module) -> Iterator[None]:
    """Marks `model` as in an importance pass; RuntimeError if another pass holds it."""
    with _models_lock:
        if model in _models_in_a_pass:
            raise RuntimeError(
                "another importance pass is running on this model (in another thread): MAS is not "
                "thread-safe; run the importance passes on one model one at a time")
        _models_in_a_pass.add(model)
    try:
        yield
    finally:
        with _models_lock:
            _models_in_a_pass.discard(model)


class MAS:
    """Memory Aware Synapses regularizer (Aljundi et al., ECCV 2018).

    Args:
        model: the network F. Its output (or `output_fn(output)`) must be batch-first.
        lambda_: λ, the penalty strength.
        mode: how a task's importance Ω_task is measured from N unlabeled samples (None: the
            convention's default; per-batch conventions allow only "batch"):
            - "per_sample" (the paper): Ω = (1/N) Σ_k |∂‖F(x_k)‖²/∂θ|; equals the authors'
              code with batch size 1. Exact, computed without per-sample gradient tensors.
            - "batch": Ω = (1/N) Σ_b |∂ Σ_{k∈b} ‖F(x_k)‖²/∂θ| (signs cancel in a batch); the
              per-batch conventions ("authors", "facil", "hsu", "avalanche") use this path
              with their own objective and normalisation.
            - "local" (Hebbian variant): each layer's own output y is the function; for a
              Linear layer Ω_ij = (1/N) Σ_k |Σ_t 2 y_kti x_ktj|.
        merge: across tasks, "sum" (Ω ← Ω + Ω_task, the paper) or "alpha"
            (Ω ← α Ω + (1−α) Ω_task; the first task sets Ω = Ω_task). None: the convention's.
        alpha: α for merge="alpha".
        output_fn: maps the model's output (tuple, dict, several heads) to the tensor F.
        backend: "auto" | "reference" | "cpp" | "triton" | "cuda" (see mas_fast.ops).
        verify: on the first batch of every importance pass (and whenever the layers that
            run or their inputs change), check each layer rule's and module-local path's
            Σ_k g_k against autograd's batch gradient, computed in the same backward; a
            module that does not match (a weight also used outside its module, a hook that
            changes the output, a subclass with another forward) moves to the next exact path,
            with a warning. Costs one weight-gradient backward per pass; False skips it.
        sync: under torch.distributed (initialized, more than one rank), `consolidate()`
            all-reduces the task's importance sums and sample counts, so every rank holds the
            Ω of the union of all ranks' data; every rank must then call `consolidate()`, and
            the ranks first check that they agree (see `consolidate`). False keeps importance
            rank-local and communicates nothing (refused for an FSDP2 model under several
            ranks, whose Ω is one tensor sharded over them). FSDP2 (`fully_shard`) models are
            supported (see mas_fast.sharding); FSDP1 and tensor parallel raise a TypeError.
        convention: whose MAS, so that a λ published with it carries over (docs/conventions.md):
            "paper" (default), "authors" (the official code), "facil", "hsu" (Hsu et al.'s
            Continual-Learning-Benchmark) or "avalanche". Each fixes the objective, the
            normalisation, the merge across tasks and the penalty's factor (see
            mas_fast.conventions); "facil" and "avalanche" run the pass in train mode.
        norm: the output norm f in Ω = mean |∂f(F)/∂θ| ("paper" and "authors" only): "l2"
            (‖F‖², default), "l1" (‖F‖₁) or "vector" (each output on its own, |∂F_i/∂θ|
            summed over i along dimension 1 of F: one backward per output).
        state_dtype: None keeps consolidated Ω and θ* in float32 (float64 for float64
            parameters). torch.bfloat16 is the lean setting: Ω in bfloat16 and θ* in the
            parameter's own dtype (2 + 2 bytes per bf16 parameter instead of 8); the running
            task still accumulates in float32 with its compensation. Every backend's penalty and
            fused steps read the lean state as it is (widened in registers, no float32 copy).

    Importance passes run in eval mode (each module's mode restored), never touch
    `p.grad` and cover the parameters with `requires_grad=True`. Parameters added later
    (a new head) have zero importance. Ω and θ* are float32 (float64 for float64
    parameters; see `state_dtype`) and follow the model's device and dtype. On an FSDP2
    model they are DTensors sharded like their parameters (see mas_fast.sharding).

    The model may be wrapped in DistributedDataParallel, DataParallel or `torch.compile`:
    MAS works on the module inside, and state names carry no wrapper prefix. A MAS is not
    thread-safe: two importance passes on one model from two threads raise a RuntimeError.
    `copy.deepcopy(mas)` copies the MAS together with its model; a MAS cannot be pickled:
    save `state_dict()` instead.
    """

    def __init__(self, model: nn.Module, lambda_: float = 1.0, mode: Optional[str] = None,
                 merge: Optional[str] = None, alpha: float = 0.5,
                 output_fn: Optional[Callable[[Any], Tensor]] = None, backend: str = "auto",
                 sync: bool = True, verify: bool = True, convention: str = "paper",
                 norm: Optional[str] = None, state_dtype: Optional[torch.dtype] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        mode, norm, merge = _check_config(lambda_, mode, merge, alpha, convention, norm)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
        _check_state_dtype(state_dtype)
        sharding.check_supported(model)
        self.state_dtype = state_dtype
        self.model = unwrap(model)
        self.sync = sync
        self.verify = verify
        self._engine = ImportanceState()  # demotions, warnings and coverage of this instance
        self.lambda_ = float(lambda_)
        self.convention, self.mode, self.norm, self.merge = convention, mode, norm, merge
        self.alpha = float(alpha)
        self.output_fn = output_fn
        self.backend = _check_usable(backend)
        self.num_tasks = 0
        self._omega: dict[str, Tensor] = {}
        self._theta_star: dict[str, Tensor] = {}
        self._task = _TaskImportance()

    def _omega_dtype(self, param: Tensor) -> torch.dtype:
        return self.state_dtype if self.state_dtype is not None else acc_dtype(param.dtype)

    def _theta_dtype(self, param: Tensor) -> torch.dtype:
        return param.dtype if self.state_dtype is not None else acc_dtype(param.dtype)

    # ------------------------------------------------------------------ importance

    def _trainable(self) -> dict[str, Tensor]:
        sharding.check_supported(self.model)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _checked_params(self, task: _TaskImportance) -> dict[str, Tensor]:
        """The trainable parameters, ValueError if they changed during `task`. Under FSDP2 every
        group is resharded first: the pass sees the sharded parameters, FSDP gathers each group
        while it runs (the root stays gathered after a forward that no backward followed)."""
        sharding.reshard(self.model)
        params = self._trainable()
        if task.count and set(params) != set(task.mean):
            added, removed = sorted(set(params) - set(task.mean)), sorted(set(task.mean) - set(params))
            raise ValueError(f"the model's trainable parameters changed during the task (added: "
                             f"{added}, removed or frozen: {removed}); consolidate() first")
        reshaped = _shape_changes(task.mean, params)
        if reshaped:
            raise ValueError("parameters changed shape during the task: " + "; ".join(reshaped))
        return params

    def _batch_sums(self, x: Any, params: dict[str, Tensor], engine: ImportanceState,
                    collective: bool = False) -> tuple[dict[str, Tensor], int, int]:
        """One batch's Σ|g| per parameter (whole-size, the convention's factor applied), its sample
        count and its weight in the running mean."""
        setting = convention_named(self.convention)
        try:
            sums, n = batch_importance(self.model, x, params, self.mode, self.output_fn, self.backend,
                                       verify=self.verify, state=engine, objective=setting.objective(self.norm),
                                       collective=collective)
        finally:
            sharding.reshard(self.model)
        factor, weight = setting.weigh(n)
        if factor != 1.0:
            torch._foreach_mul_(list(sums.values()), factor)
        return sums, n, weight

    def _accumulate_into(self, task: _TaskImportance, x: Any, engine: Optional[ImportanceState] = None) -> int:
        params = self._checked_params(task)
        sums, n, weight = self._batch_sums(x, params, engine if engine is not None else self._engine)
        # FSDP2 on one rank (or sync=False): the task holds each sum sharded like its parameter
        task.add({k: sharding.shard_like(v, params[k]) for k, v in sums.items()}, weight, self.backend)
        return n

    def _lockstep(self) -> bool:
        """True when importance passes run in step on every rank, each batch reduced over ranks into
        each rank's shard of the running task: an FSDP2 model under several ranks, sync=True."""
        return self.sync and distributed.active() and bool(sharding.fsdp2_modules(self.model))

    def _lockstep_step(self, task: _TaskImportance, x: Any, engine: ImportanceState, real: bool) -> Optional[int]:
        """One step of a lockstep pass: this rank's batch `x` (a stand-in when not `real`: its
        importance counts nothing), then every rank's sums reduce-scattered into this rank's shard
        of `task`. Returns the batch's sample count; None when another rank failed (nothing added).
        A failure here is reported to the other ranks, then raised."""
        try:
            params = self._checked_params(task)
            sums, n, weight = self._batch_sums(x, params, engine, collective=True)
        except Exception:
            sharding.exchange(_FAILED)
            raise
        reports = sharding.exchange(_OK, weight if real else 0)
        if any(code == _FAILED for code, _ in reports):
            return None
        if not real:
            torch._foreach_zero_(list(sums.values()))
        task.add(sharding.reduced_to_shards(sums, params), sum(w for _, w in reports), self.backend)
        return n

    def _lockstep_pass(self, task: _TaskImportance, batches: Iterable, engine: ImportanceState) -> None:
        """Every rank's batches in lockstep (each step gathers FSDP's groups in its forward and
        backward, and reduces its sums over ranks) until every rank's loader is exhausted: a rank
        whose batches ran out takes part with a stand-in, its last batch (or, for a rank that had
        none, the batch of the lowest rank that has one). Stops when another rank failed (the
        agreement in `consolidate` then raises); a failure of this rank is reported, then raised."""
        batches, last = iter(batches), None
        while True:
            try:
                x, code = batch_input(next(batches)), _HAS_BATCH
            except StopIteration:
                x, code = last, _DONE if last is not None else _EMPTY
            except Exception:
                sharding.exchange(_FAILED)
                raise
            codes = [c for c, _ in sharding.exchange(code)]
            if _FAILED in codes or _HAS_BATCH not in codes:
                return
            if _EMPTY in codes:
                device = next(self.model.parameters()).device
                stand_in = sharding.broadcast_input(x, codes.index(_HAS_BATCH), device)
                x = stand_in if code == _EMPTY else x
            if self._lockstep_step(task, x, engine, real=code == _HAS_BATCH) is None:
                return
            last = x

    @_normal_tensors
    def accumulate(self, x: Any) -> int:
        """Add one unlabeled batch to the current task's running Ω; returns its sample count.

        Usable at any time (e.g. on unlabeled test-time data): streaming batches of any
        sizes gives the same Ω as one pass over their union (per-sample modes; a
        convention whose Ω is a mean over batches depends on the batches, as its library does).
        On an FSDP2 model under several ranks it is a collective: every rank calls it, each with
        its own batch, and the batches' importance is reduced over ranks into each rank's shard
        of the running task (a failure on one rank raises on every rank, with nothing added).
        """
        with _exclusive_pass(self.model):
            if not self._lockstep():
                return self._accumulate_into(self._task, x)
            n = self._lockstep_step(self._task, x, self._engine, real=True)
        if n is None:
            raise distributed.RankFailedError("accumulate() failed on another rank; no rank's running task changed")
        return n

    @_normal_tensors
    def consolidate(self, loader: Optional[Iterable] = None, progress: bool = True) -> None:
        """End the current task: merge its Ω into the total and snapshot θ*.

        With a `loader`, first accumulate over it (batches that are tuples/lists use their
        first element; labels are ignored), with a tqdm progress bar unless `progress=False`.
        If the loader or an importance pass fails, nothing changes.

        Under torch.distributed (see `sync`) this is a collective: a rank may bring no
        samples, but must call it. After its local pass each rank exchanges one small
        tensor (ok/failed, sample count, a digest of the parameter names, shapes, dtypes,
        mode, merge, α and task count). Every rank then either commits the same Ω, or
        raises before any reduction with no state changed: a rank whose pass failed raises
        its own exception and the others `distributed.RankFailedError` naming it; differing
        parameters or configuration raise the same ValueError on every rank.
        """
        # A pass over a loader works on a copy of the engine state (demotions, warnings,
        # coverage), committed with the rest of the state.
        if not self.sync and distributed.active() and any(map(sharding.is_sharded, self.model.parameters())):
            raise ValueError("sync=False cannot consolidate an FSDP2 model under several ranks: each rank "
                             "would keep its shard of its own importance, and the shards would not form one Ω; "
                             "use sync=True")
        engine = self._engine.copy() if loader is not None else self._engine
        if self._lockstep():  # FSDP2: every batch was reduced; each rank holds its shard of the union
            agreed = distributed.agreed(lambda: self._contribution(loader, progress, engine, reduced=True))
            task_mean, count = agreed.sums, agreed.count
        elif self.sync and distributed.active():
            task_mean, count = distributed.union_mean(lambda: self._contribution(loader, progress, engine))
        else:
            task = self._local_task(loader, progress, engine)
            task_mean, count = task.mean, task.count
        if count == 0:
            raise ValueError("nothing to consolidate: the loader yielded no samples"
                             if loader is not None else
                             "nothing to consolidate: call accumulate(x) or pass a loader first")
        named = dict(self.model.named_parameters())
        self._check_model_holds(task_mean, named)
        # FSDP2: Ω takes its parameter's sharding (a rank keeps its shard of a whole mean).
        omega = self._merged({n: sharding.like(t, named[n]) for n, t in task_mean.items()})
        omega = {n: o.to(self._omega_dtype(named[n])) for n, o in omega.items()}  # merged in fp32
        theta_star = {n: named[n].detach().to(self._theta_dtype(named[n]), copy=True) for n in omega}
        self._omega, self._theta_star = omega, theta_star
        self._task = _TaskImportance()
        self._engine = engine
        self._engine.new_pass()  # the next task's first batch is verified again
        self.num_tasks += 1

    def _local_task(self, loader: Optional[Iterable], progress: bool,
                    engine: ImportanceState) -> _TaskImportance:
        """The running task, extended by a pass over `loader` (on a copy: nothing changes if
        the loader or a pass fails)."""
        if loader is None:
            return self._task
        from tqdm.auto import tqdm

        _check_loader(loader)
        task = self._task.copy() if self._task.count else _TaskImportance()
        engine.new_pass()
        # without a bar, the loader is iterated as a plain loop does: tqdm.auto's (asyncio)
        # tqdm calls iter(loader) when built, and each DataLoader iterator draws a seed from
        # the global RNG (a train-mode pass must see the dropout masks a plain loop would)
        batches = tqdm(loader, desc="MAS importance", leave=False) if progress else loader
        with _exclusive_pass(self.model):
            if self._lockstep():
                self._lockstep_pass(task, batches, engine)
            else:
                for batch in batches:
                    self._accumulate_into(task, batch_input(batch), engine)
        return task

    def _check_model_holds(self, task_mean: Mapping[str, Tensor], named: Mapping[str, Tensor]) -> None:
        """ValueError unless the model still has every parameter with importance, unreshaped."""
        missing = sorted(n for n in set(self._omega) | set(task_mean) if n not in named)
        if missing:
            raise ValueError(f"parameters with importance are missing from the model: {missing}")
        reshaped = _shape_changes(self._omega, named)
        if reshaped:
            raise ValueError("parameters changed shape since the last consolidation: " + "; ".join(reshaped))

    def _contribution(self, loader: Optional[Iterable], progress: bool, engine: ImportanceState,
                      reduced: bool = False) -> distributed.Contribution:
        """This rank's part of a synchronised consolidation: its local pass, checked against
        the model, as sums over its samples (zeros for the trainable parameters if it has none);
        `reduced` (a lockstep pass): the task's mean over every rank's samples, this rank's shards."""
        task = self._local_task(loader, progress, engine)
        named = dict(self.model.named_parameters())
        self._check_model_holds(task.mean, named)
        covered = task.mean if task.count else self._trainable()
        config = {"convention": self.convention, "mode": self.mode, "norm": self.norm, "merge": self.merge,
                  "consolidated tasks": self.num_tasks}
        if self.merge == "alpha":
            config["alpha"] = self.alpha
        if reduced:
            return distributed.Contribution(distributed.signature(config, {n: named[n] for n in named if n in covered}),
                                            dict(task.mean), task.count)
        return distributed.contribution(config, task.mean, task.compensation, task.count,
                                        {n: named[n] for n in named if n in covered})

    def _merged(self, task_omega: dict[str, Tensor]) -> dict[str, Tensor]:
        setting = convention_named(self.convention)
        alpha = self.merge == "alpha"
        if not self._omega and not (alpha and setting.alpha_from_zero):
            return {n: t.clone() for n, t in task_omega.items()}
        a, b = (self.alpha, 1.0 - self.alpha) if alpha else (1.0, 1.0)
        merged = {n: t.to(task_omega[n].dtype if n in task_omega else acc_dtype(t.dtype), copy=True)
                  for n, t in self._omega.items()}  # lean Ω merges in float32
        new = [n for n in task_omega if n not in merged]
        for n in new:  # Ω starts at 0 there, or (new_unmixed) takes the task's Ω as it is
            merged[n] = task_omega[n].clone() if alpha and setting.new_unmixed else torch.zeros_like(task_omega[n])
        mixed = [n for n in task_omega if not (alpha and setting.new_unmixed and n in new)]
        untouched = [n for n in merged if n not in task_omega]
        ops.merge_(sharding.locals_of([merged[n] for n in mixed]), sharding.locals_of([task_omega[n] for n in mixed]),
                   a, b, backend=self.backend)
        if untouched and a != 1.0:  # absent from this task: Ω_task = 0 there
            torch._foreach_mul_(sharding.locals_of([merged[n] for n in untouched]), a)
        return merged

    @_normal_tensors
    def coverage(self, x: Any = None) -> dict[str, str]:
        """Which path computed each trainable parameter's importance in the last pass (the
        slowest any of its batches took): "rule" (the layer's closed form), "module-local"
        (the per-sample VJP of its module alone) or "whole-model" (the torch.func fallback);
        "batch" in mode="batch". A pass is a consolidate(loader), or the accumulate() calls
        since the last consolidate().

        With `x`, first runs a dry importance pass on that batch (nothing of the MAS state
        changes). Raises ValueError before any pass when `x` is not given.
        """
        if x is None:
            if not self._engine.coverage:
                raise ValueError("no importance pass has run yet: call coverage(x) with a batch, or "
                                 "accumulate()/consolidate() first")
            return dict(self._engine.coverage)
        engine = self._engine.copy()
        engine.new_pass()
        with _exclusive_pass(self.model):  # a collective under FSDP2 (each forward gathers the groups)
            self._batch_sums(x, self._checked_params(_TaskImportance()), engine, collective=self._lockstep())
        return dict(engine.coverage)

    # ------------------------------------------------------------------ penalty

    def penalty_terms(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Aligned lists (parameters, θ*, Ω) of the consolidated parameters (empty before).

        Raises ValueError listing parameters that are missing from the model or changed shape.
        Fused optimizers use it to fold the penalty into their step.
        """
        return self._aligned() if self._omega else ([], [], [])

    def _aligned(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        named = dict(self.model.named_parameters())
        problems = [f"{n}: missing from the model" for n in self._omega if n not in named]
        problems += _shape_changes(self._omega, named)
        if problems:
            raise ValueError("the model does not match the consolidated MAS state: " + "; ".join(problems))
        for n, o in self._omega.items():  # follow the model to a new device or dtype
            p = named[n]
            if (o.device, o.dtype, self._theta_star[n].dtype) != (p.device, self._omega_dtype(p), self._theta_dtype(p)):
                self._omega[n] = o.to(device=p.device, dtype=self._omega_dtype(p))
                self._theta_star[n] = self._theta_star[n].to(device=p.device, dtype=self._theta_dtype(p))
            if sharding.is_sharded(named[n]) != sharding.is_sharded(o):  # sharded after consolidation
                self._omega[n] = sharding.like(self._omega[n], named[n])
                self._theta_star[n] = sharding.like(self._theta_star[n], named[n])
        names = list(self._omega)
        return [named[n] for n in names], [self._theta_star[n] for n in names], [self._omega[n] for n in names]

    def _zero(self) -> Tensor:
        p = next(self.model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    @property
    def penalty_backend(self) -> str:
        """The backend of the penalty and of the fused optimizer steps: `backend` (with either
        `state_dtype`)."""
        return self.backend

    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² as a differentiable scalar (0 before the first consolidate)."""
        if not self._omega:
            return self._zero()
        params, theta_star, omega = self._aligned()
        sharded, plain = sharding.split_by_sharding(range(len(params)), params)
        if not sharded:
            return ops.penalty(params, theta_star, omega, self.penalty_strength, backend=self.penalty_backend)
        # FSDP2: each rank's shards, summed over ranks; each shard's gradient reaches it once.
        value = sharding.sum_over_ranks(ops.penalty(
            *(sharding.locals_of([ts[i] for i in sharded]) for ts in (params, theta_star, omega)),
            self.penalty_strength, backend=self.penalty_backend))
        if plain:  # parameters outside fully_shard: replicated, counted once
            value = value + ops.penalty(*([ts[i] for i in plain] for ts in (params, theta_star, omega)),
                                        self.penalty_strength, backend=self.penalty_backend)
        return value

    def add_penalty_grad_(self) -> Tensor:
        """After `loss.backward()`: p.grad += 2λΩ(θ − θ*); returns the penalty value.

        Equivalent to adding `penalty()` to the loss. Covered parameters whose grad is
        None (unused by this loss, e.g. an old head) get a zero grad first; frozen
        parameters are skipped.
        """
        if not self._omega:
            return self._zero()
        params, theta_star, omega = self._aligned()
        keep = [i for i, p in enumerate(params) if p.requires_grad]
        if keep and all(params[i].grad is None for i in keep):
            raise RuntimeError("add_penalty_grad_() found no gradients: call it after loss.backward()")
        for i in keep:
            if params[i].grad is None:
                params[i].grad = torch.zeros_like(params[i])
        sharded, plain = sharding.split_by_sharding(keep, params)

        def penalty_and_grad_(index: list[int]) -> Tensor:
            return ops.penalty_and_grad_(*(sharding.locals_of(ts) for ts in (
                [params[i] for i in index], [params[i].grad for i in index], [theta_star[i] for i in index],
                [omega[i] for i in index])), self.penalty_strength, backend=self.penalty_backend)

        if not sharded:
            return penalty_and_grad_(plain)
        with torch.no_grad():  # FSDP2: each rank's shards, summed over ranks
            value = sharding.sum_over_ranks(penalty_and_grad_(sharded))
        return value + penalty_and_grad_(plain) if plain else value

    # ------------------------------------------------------------------ views and state

    @property
    def lambda_(self) -> float:
        """λ, the penalty strength; may be changed between tasks (a finite number >= 0)."""
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        check_lambda(value)
        self._lambda = float(value)

    @property
    def penalty_strength(self) -> float:
        """The factor of Σ Ω (θ − θ*)² in the penalty: λ times the convention's factor (½ for
        "facil", 1 otherwise). Fused optimizers use it."""
        return self.lambda_ * convention_named(self.convention).penalty_factor

    @property
    def alpha(self) -> float:
        """α for merge="alpha"; may be changed between tasks (a number in [0, 1])."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        check_alpha(value)
        self._alpha = float(value)

    @property
    def importance(self) -> Mapping[str, Tensor]:
        """Consolidated Ω by parameter name (a read-only mapping; do not modify the tensors)."""
        return MappingProxyType(self._omega)

    @property
    def theta_star(self) -> Mapping[str, Tensor]:
        """θ*, the parameters at the last consolidation (read-only mapping)."""
        return MappingProxyType(self._theta_star)

    @property
    def task_importance(self) -> Mapping[str, Tensor]:
        """The current task's running Ω (not yet consolidated). On an FSDP2 model: DTensors sharded
        like the parameters, the running Ω of every rank's samples."""
        return MappingProxyType(self._task.mean)

    @property
    def samples_seen(self) -> int:
        """Samples accumulated in the current task so far (batches, for a convention whose Ω is
        a mean over batches: "authors", "hsu", "avalanche"); every rank's, on an FSDP2 model."""
        return self._task.count

    def state_dict(self, full_state_dict: bool = False) -> dict[str, Any]:
        """A snapshot in tensors and plain types: loads with `torch.load(..., weights_only=True)`.

        Later `accumulate()` / `consolidate()` calls do not change it: its tensors are shared
        with the MAS until the MAS next updates them, and then the MAS updates copies (no copy
        is made for a snapshot that is only saved). Do not modify its tensors in place.

        On an FSDP2 model Ω and θ* are DTensors sharded like their parameters: save them with
        `torch.distributed.checkpoint` (see `state_dict_template` to load). `full_state_dict=True`
        gathers them into whole tensors instead (a collective: every rank must call it), like
        torch's `get_state_dict(..., StateDictOptions(full_state_dict=True))`.
        """
        if not isinstance(full_state_dict, bool):
            raise TypeError(f"full_state_dict must be a bool, got {type(full_state_dict).__name__}")
        task = self._task
        task.exported = True
        whole = sharding.full if full_state_dict else (lambda t: t)
        return {
            "format": STATE_FORMAT, "convention": self.convention, "mode": self.mode, "norm": self.norm,
            "lambda_": self.lambda_, "merge": self.merge,
            "alpha": self.alpha, "num_tasks": self.num_tasks,
            "omega": {n: whole(t) for n, t in self._omega.items()},
            "theta_star": {n: whole(t) for n, t in self._theta_star.items()},
            "task_count": task.count, "task_mean": {n: whole(t) for n, t in task.mean.items()},
            "task_compensation": {n: whole(t) for n, t in task.compensation.items()},
        }

    def state_dict_template(self, stored_keys: Iterable[str], prefix: str = "") -> dict[str, Any]:
        """A `state_dict()`-shaped target for `torch.distributed.checkpoint.load`: zero tensors
        sharded like this model's parameters, for the entries a checkpoint holds.

        `stored_keys`: the checkpoint's flattened keys, e.g.
        `FileSystemReader(path).read_metadata().state_dict_metadata`; `prefix`: where the MAS
        state sits in the saved dict (`"mas."` for `{"mas": mas.state_dict()}`). Load into it,
        then pass it to `load_state_dict`: the checkpoint may come from any world size.
        """
        if isinstance(stored_keys, (str, bytes)) or not isinstance(stored_keys, Iterable):
            raise TypeError(f"stored_keys must be an iterable of checkpoint keys, got {type(stored_keys).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        stored = set(stored_keys)
        template = {k: v for k, v in self.state_dict().items() if k not in STATE_GROUPS}
        template["task_count"] = 0
        for group in STATE_GROUPS:
            template[group] = {}
            for n, p in self.model.named_parameters():
                if f"{prefix}{group}.{n}" in stored:
                    dtype = {"omega": self._omega_dtype(p), "theta_star": self._theta_dtype(p)}.get(
                        group, acc_dtype(p.dtype))
                    zeros = torch.zeros(p.shape, dtype=dtype, device=p.device)
                    template[group][n] = sharding.shard_like(zeros, p)
        return template

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of MAS state this rank holds: consolidated Ω ("omega"), θ* ("theta_star"), the
        running task's mean and compensation ("task"), and their "total". On an FSDP2 model Ω
        and θ* count this rank's shards only."""
        held = sharding.state_bytes({"omega": self._omega, "theta_star": self._theta_star,
                                     "task_mean": self._task.mean, "task_compensation": self._task.compensation})
        out = {"omega": held["omega"], "theta_star": held["theta_star"],
               "task": held["task_mean"] + held["task_compensation"]}
        out["total"] = sum(out.values())
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state (configuration included, like torch.optim); the model must match.

        Raises ValueError listing every parameter whose name or shape does not match,
        before anything changes. States saved in format 1 load too; names saved with a
        wrapper prefix (`module.`, `_orig_mod.`) load into the unwrapped model.
        """
        state = _upgraded(state)
        keys = ("format", "mode", "lambda_", "merge", "alpha", "num_tasks", "task_count", *STATE_GROUPS)
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            missing = [k for k in keys if not isinstance(state, Mapping) or k not in state]
            raise ValueError(f"not a mas_fast MAS state_dict (missing keys: {missing})")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"unsupported MAS state format {state['format']!r} (expected {STATE_FORMAT!r})")
        # a state without a convention (or norm) is the paper's (with the L2 norm)
        setting = (state.get("convention", "paper"), state.get("norm", "l2"))
        _check_config(state["lambda_"], state["mode"], state["merge"], state["alpha"], *setting)
        if set(state["omega"]) != set(state["theta_star"]) or \
                set(state["task_mean"]) != set(state["task_compensation"]):
            raise ValueError("corrupt MAS state: omega/theta_star or task_mean/task_compensation name sets differ")
        named = dict(self.model.named_parameters())
        state = {**state, **{g: {_as_model_name(n, named): t for n, t in state[g].items()} for g in STATE_GROUPS}}
        problems: dict[str, str] = {}  # one line per parameter name
        for group in STATE_GROUPS:
            for n, t in state[group].items():
                if not isinstance(t, Tensor) or not t.is_floating_point():
                    problems.setdefault(n, f"{n}: {group} is not a floating-point tensor")
                elif n not in named:
                    problems.setdefault(n, f"{n}: no such parameter in the model")
                elif tuple(t.shape) != tuple(named[n].shape):
                    problems.setdefault(n, f"{n}: stored shape {tuple(t.shape)} != model shape "
                                           f"{tuple(named[n].shape)}")
        if problems:
            unmatched = sorted(set(named) - set(state["omega"]) - set(state["task_mean"]))
            raise ValueError("MAS state does not match the model: " + "; ".join(problems.values())
                             + (f" (model parameters without stored state: {unmatched})" if unmatched else ""))
        corrupt = _corrupt_values(state)
        if corrupt:
            raise ValueError("corrupt MAS state: " + "; ".join(corrupt))

        def place(group: str) -> dict[str, Tensor]:
            # every group takes its parameter's sharding (a running task: each rank its shard of it)
            dtype = {"omega": self._omega_dtype, "theta_star": self._theta_dtype}.get(
                group, lambda p: acc_dtype(p.dtype))
            return {n: sharding.like(t.detach(), named[n]).to(device=named[n].device, dtype=dtype(named[n]), copy=True)
                    for n, t in state[group].items()}

        task = _TaskImportance()
        task.mean, task.compensation = place("task_mean"), place("task_compensation")
        task.count = int(state["task_count"])
        self._omega, self._theta_star, self._task = place("omega"), place("theta_star"), task
        self.mode, self.lambda_, self.merge = state["mode"], float(state["lambda_"]), state["merge"]
        self.convention, self.norm = setting
        self.alpha, self.num_tasks = float(state["alpha"]), int(state["num_tasks"])

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a MAS cannot be pickled or shallow-copied (it references its model): save "
                        "mas.state_dict() beside model.state_dict() and restore it with "
                        "MAS(model).load_state_dict(state); copy.deepcopy(mas) copies a MAS with its model")

    def __deepcopy__(self, memo: dict[int, Any]) -> "MAS":
        """A MAS over a deep copy of the model (the same copy as `deepcopy` of anything that
        holds both), with copies of every state tensor."""
        other = object.__new__(type(self))
        memo[id(self)] = other
        other.__dict__.update(copy.deepcopy(self.__dict__, memo))
        other._task.exported = False
        return other
