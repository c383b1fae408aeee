"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) on mas_fast's penalty kernels.

Per optimizer step, every parameter's path integral grows by the loss gradient g (the
gradient of the loss *without* the penalty) times the step's actual parameter change Δθ:

    ω ← ω − g·Δθ

At the end of a task, with Δ = θ_end − θ_start the change over the whole task and ξ > 0 the
damping that keeps parameters which did not move (Δ = 0) finite:

    Ω ← Ω + ω / (Δ² + ξ),    ω ← 0,    θ* ← θ_end

and while learning later tasks the penalty is c Σ Ω (θ − θ*)², gradient 2cΩ(θ − θ*): MAS's
form, so it runs on `mas_fast.ops.penalty` / `penalty_and_grad_` and folds into the fused
optimizers (mas_fast.optim) like MAS. θ_start of the first task is θ when the
SynapticIntelligence is created, then θ* of the previous task. This is the update of Hsu et
al.'s Continual-Learning-Benchmark (`agents/regularization.py`, class SI), which the tests
transcribe; the authors' pathint code is the same except that it clips Ω at 0 after each task
(`nonnegative=True`).
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn as nn

from .. import ops, sharding
from ..ops.policy import acc_dtype
from ..optim import add_penalty_grad
from ..regularizer import _check_usable, unwrap

Tensor = torch.Tensor
STATE_FORMAT = "mas_fast.SI/1"
STATE_GROUPS = ("omega", "theta_star", "path")


def _check_number(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


class SynapticIntelligence:
    """Synaptic Intelligence regularizer (Zenke et al. 2017), MAS's surface.

    Args:
        model: the network; the parameters with `requires_grad` now are the ones tracked.
        c: the penalty strength (Zenke's c, Hsu et al.'s reg_coef): penalty c Σ Ω (θ − θ*)².
        xi: ξ > 0, the damping of Ω = ω / (Δ² + ξ) (0.1 in both reference codes).
        nonnegative: clip Ω at 0 after each task, as the authors' pathint code does (ω of a
            parameter can be negative when a step goes uphill on the loss).
        backend: the mas_fast.ops backend of the penalty ("auto", "reference", "cpp", ...).

    Every training step::

        loss.backward()              # the loss alone: g must not hold the penalty
        si.begin_step()              # snapshot θ and g
        si.add_penalty_grad_()       # or a mas_fast.optim optimizer with regularizer=si
        opt.step()
        si.end_step()                # ω −= g·Δθ

    and `si.consolidate()` at the end of each task. State is float32 (float64 for float64
    parameters). Every public method validates first and mutates last.
    """

    def __init__(self, model: nn.Module, c: float = 1.0, xi: float = 0.1, nonnegative: bool = False,
                 backend: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_number("c", c, positive=False)
        _check_number("xi", xi, positive=True)
        if not isinstance(nonnegative, bool):
            raise TypeError(f"nonnegative must be a bool, got {type(nonnegative).__name__}")
        sharding.check_supported(model)
        model = unwrap(model)
        if any(sharding.is_sharded(p) for p in model.parameters()):
            raise TypeError("SynapticIntelligence does not support FSDP2-sharded (DTensor) parameters")
        self.backend = _check_usable(backend)
        self.model, self.c, self.xi, self.nonnegative = model, c, float(xi), nonnegative
        self.num_tasks = 0
        self.steps = 0  # optimizer steps recorded since the last consolidation
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._theta_star = {n: p.detach().to(acc_dtype(p.dtype), copy=True) for n, p in trainable.items()}
        self._path = {n: torch.zeros_like(t) for n, t in self._theta_star.items()}
        self._omega: dict[str, Tensor] = {}
        self._step: tuple[list[Tensor], list[Tensor]] | None = None  # (θ, g) at begin_step
        self._buffers: tuple[list[Tensor], list[Tensor]] | None = None  # reused every step

    # ------------------------------------------------------------------ views

    @property
    def c(self) -> float:
        """c, the penalty strength; may be changed between tasks (a finite number >= 0)."""
        return self._c

    @c.setter
    def c(self, value: float) -> None:
        _check_number("c", value, positive=False)
        self._c = float(value)

    @property
    def penalty_strength(self) -> float:
        """c, the factor of Σ Ω (θ − θ*)² (read by the fused optimizers)."""
        return self.c

    @property
    def penalty_backend(self) -> str:
        """The backend of the penalty and of the fused optimizer steps."""
        return self.backend

    @property
    def importance(self) -> Mapping[str, Tensor]:
        """Consolidated Ω by parameter name (read-only mapping; empty before the first task ends)."""
        return MappingProxyType(self._omega)

    @property
    def theta_star(self) -> Mapping[str, Tensor]:
        """θ at the last consolidation (θ at construction before the first): the anchor of the
        penalty and the start of the current task's Δ."""
        return MappingProxyType(self._theta_star)

    @property
    def path_integral(self) -> Mapping[str, Tensor]:
        """ω, the current task's path integral Σ −g·Δθ so far."""
        return MappingProxyType(self._path)

    def _aligned(self) -> tuple[list[str], list[Tensor]]:
        """The tracked names and their parameters; ValueError if the model no longer holds them."""
        named = dict(self.model.named_parameters())
        problems = [f"{n}: missing from the model" for n in self._theta_star if n not in named]
        problems += [f"{n}: stored shape {tuple(t.shape)} != model shape {tuple(named[n].shape)}"
                     for n, t in self._theta_star.items() if n in named and t.shape != named[n].shape]
        if problems:
            raise ValueError("the model does not match the SI state: " + "; ".join(problems))
        for n, t in self._theta_star.items():  # follow the model to a new device
            if t.device != named[n].device:
                for group in (self._theta_star, self._path, self._omega):
                    if n in group:
                        group[n] = group[n].to(named[n].device)
                self._buffers = None
        names = list(self._theta_star)
        return names, [named[n] for n in names]

    # ------------------------------------------------------------------ path integral

    @torch.no_grad()
    def begin_step(self) -> None:
        """Snapshot θ and the loss gradient g: after `loss.backward()` on the loss alone, before
        the penalty gradient is added and before `opt.step()`. A tracked parameter without a
        gradient counts g = 0."""
        if self._step is not None:
            raise RuntimeError("begin_step() called twice: call end_step() after opt.step()")
        names, params = self._aligned()
        if params and all(p.grad is None for p in params):
            raise RuntimeError("begin_step() found no gradients: call it after loss.backward()")
        if self._buffers is None:
            self._buffers = ([torch.empty_like(self._theta_star[n]) for n in names],
                             [torch.empty_like(self._theta_star[n]) for n in names])
        theta, grad = self._buffers
        torch._foreach_copy_(theta, params)
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        torch._foreach_copy_([grad[i] for i in with_grad], [params[i].grad for i in with_grad])
        for i in set(range(len(params))) - set(with_grad):
            grad[i].zero_()
        self._step = theta, grad

    @torch.no_grad()
    def end_step(self) -> None:
        """After `opt.step()`: ω ← ω − g·Δθ with Δθ the step's change of θ."""
        if self._step is None:
            raise RuntimeError("end_step() without begin_step(): call begin_step() before opt.step()")
        names, params = self._aligned()
        theta, grad = self._step
        torch._foreach_sub_(theta, params)  # θ_before − θ_after = −Δθ
        torch._foreach_addcmul_([self._path[n] for n in names], grad, theta)
        self._step = None
        self.steps += 1

    @torch.no_grad()
    def consolidate(self) -> None:
        """End a task: Ω ← Ω + ω / ((θ − θ_start)² + ξ), then ω ← 0 and θ* ← θ.

        RuntimeError if a step is open or no step was recorded since the last consolidation.
        """
        if self._step is not None:
            raise RuntimeError("consolidate() between begin_step() and end_step()")
        names, params = self._aligned()
        if self.steps == 0:
            raise RuntimeError("no optimizer step was recorded in this task: call begin_step() / "
                               "end_step() around every opt.step()")
        theta = [p.detach().to(self._theta_star[n].dtype, copy=True) for n, p in zip(names, params)]
        denom = torch._foreach_sub(theta, [self._theta_star[n] for n in names])
        torch._foreach_mul_(denom, denom)
        torch._foreach_add_(denom, self.xi)
        task = torch._foreach_div([self._path[n] for n in names], denom)
        if self._omega:
            torch._foreach_add_(task, [self._omega[n] for n in names])
        if self.nonnegative:
            torch._foreach_clamp_min_(task, 0.0)
        self._omega = dict(zip(names, task))
        self._theta_star = dict(zip(names, theta))
        for n in names:
            self._path[n].zero_()
        self.steps = 0
        self.num_tasks += 1

    # ------------------------------------------------------------------ penalty

    def penalty_terms(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Aligned lists (parameters, θ*, Ω), empty before the first consolidation (the fused
        optimizers' protocol, see mas_fast.optim)."""
        if not self._omega:
            return [], [], []
        names, params = self._aligned()
        return params, [self._theta_star[n] for n in names], [self._omega[n] for n in names]

    def _zero(self) -> Tensor:
        p = next(self.model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def penalty(self) -> Tensor:
        """c Σ Ω (θ − θ*)² as a differentiable scalar (0 before the first consolidation)."""
        params, theta_star, omega = self.penalty_terms()
        if not params:
            return self._zero()
        return ops.penalty(params, theta_star, omega, self.c, backend=self.backend)

    def add_penalty_grad_(self) -> Tensor:
        """After `loss.backward()` (and `begin_step()`): p.grad += 2cΩ(θ − θ*); returns the
        penalty value. Tracked parameters without a gradient get a zero one first; frozen ones
        are skipped."""
        value = add_penalty_grad(self)
        return self._zero() if value is None else value

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """A snapshot in tensors and plain types (copies; a step in progress is not saved)."""
        return {"format": STATE_FORMAT, "c": self.c, "xi": self.xi, "nonnegative": self.nonnegative,
                "num_tasks": self.num_tasks, "steps": self.steps,
                **{g: {n: t.clone() for n, t in group.items()}
                   for g, group in zip(STATE_GROUPS, (self._omega, self._theta_star, self._path))}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state (configuration included); ValueError/TypeError naming every problem
        before anything changes. An open step is dropped."""
        keys = ("format", "c", "xi", "nonnegative", "num_tasks", "steps", *STATE_GROUPS)
        missing = [k for k in keys if not isinstance(state, Mapping) or k not in state]
        if missing:
            raise ValueError(f"not a mas_fast SynapticIntelligence state_dict (missing keys: {missing})")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"unsupported SI state format {state['format']!r} (expected {STATE_FORMAT!r})")
        _check_number("c", state["c"], positive=False)
        _check_number("xi", state["xi"], positive=True)
        if not isinstance(state["nonnegative"], bool):
            raise TypeError(f"nonnegative must be a bool, got {type(state['nonnegative']).__name__}")
        problems = [f"{k} = {state[k]!r} is not a count >= 0" for k in ("num_tasks", "steps")
                    if isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0]
        names = set(state["theta_star"])
        if set(state["path"]) != names or (state["omega"] and set(state["omega"]) != names):
            problems.append("omega, theta_star and path name different parameters")
        named = dict(self.model.named_parameters())
        for group in STATE_GROUPS:
            for n, t in state[group].items():
                if not isinstance(t, Tensor) or not t.is_floating_point():
                    problems.append(f"{group}[{n}] is not a floating-point tensor")
                elif n not in named:
                    problems.append(f"{group}[{n}]: no such parameter in the model")
                elif tuple(t.shape) != tuple(named[n].shape):
                    problems.append(f"{group}[{n}]: stored shape {tuple(t.shape)} != model shape "
                                    f"{tuple(named[n].shape)}")
                elif not bool(torch.isfinite(t).all()):
                    problems.append(f"{group}[{n}] is not finite")
        if problems:
            raise ValueError("SI state does not match the model: " + "; ".join(problems))

        def place(group: str) -> dict[str, Tensor]:
            return {n: t.detach().to(device=named[n].device, dtype=acc_dtype(named[n].dtype), copy=True)
                    for n, t in state[group].items()}

        self._omega, self._theta_star, self._path = place("omega"), place("theta_star"), place("path")
        self.c, self.xi, self.nonnegative = float(state["c"]), float(state["xi"]), state["nonnegative"]
        self.num_tasks, self.steps = state["num_tasks"], state["steps"]
        self._step = self._buffers = None
