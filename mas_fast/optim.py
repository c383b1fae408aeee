"""SGD, Adam and AdamW with the MAS penalty folded into the step.

    mas = MAS(model, lambda_=1.0)
    opt = mas_fast.optim.AdamW(model.parameters(), lr=1e-3, regularizer=mas)
    ...
    loss = criterion(model(x), y)          # no mas.penalty() term
    opt.zero_grad(); loss.backward(); opt.step()
    opt.last_penalty                        # λΣΩ(θ−θ*)² before the step

Each step equals torch.optim's step on the gradient of `loss + mas.penalty()`: parameters
that MAS covers take g + 2λΩ(θ−θ*) (a covered trainable parameter without a gradient takes
the penalty gradient alone, as autograd would give it), all others a plain step. One
multi-tensor kernel reads θ, g, the state, θ* and Ω once ("cpp" backend on CPU; the reference
twin anywhere). Arguments are torch.optim's, minus the implementation switches (foreach,
fused, capturable, differentiable); the state and state_dict have torch.optim's layout, so
state_dicts load into each other.

`penalty_step="proximal"` (any optimizer) applies the penalty by its proximal map instead:
the step on the loss gradient alone gives θ', then θ ← θ* + (θ' − θ*) / (1 + 2·lr·λΩ), the
exact minimiser of λΩ(θ−θ*)² + (θ−θ')²/(2·lr). It is stable for any λΩ (the explicit SGD
step diverges once 2·lr·λΩ > 2) and, under Adam, its strength does not depend on the second
moment of the loss gradient; the optimizer state (momentum buffer, Adam moments) holds the
loss gradient's history only. See docs/kernels.md.

`regularizer` is anything with MAS's penalty form λΣΩ(θ−θ*)² that implements
`PenaltyRegularizer`: mas_fast.MAS, mas_fast.cl.si.SynapticIntelligence and
mas_fast.cl.ewc.OnlineEWC do.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from . import ops
from .ops.optim_config import check_penalty_step
from .sharding import on_local_shards, split_by_sharding, sum_over_ranks

Tensor = torch.Tensor

__all__ = ["SGD", "Adam", "AdamW", "PenaltyRegularizer"]


class PenaltyRegularizer(Protocol):
    """What the fused optimizers read of a regularizer whose penalty is λ Σ Ω (θ − θ*)²."""

    def penalty_terms(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Aligned lists (parameters, θ*, Ω) of the penalised parameters; empty for no penalty."""

    @property
    def penalty_strength(self) -> float:
        """λ, the factor of Σ Ω (θ − θ*)²."""

    @property
    def penalty_backend(self) -> str:
        """The mas_fast.ops backend of the fused step when the optimizer is given none."""


def add_penalty_grad(regularizer: PenaltyRegularizer) -> Optional[Tensor]:
    """p.grad += 2λΩ(θ − θ*) for the regularizer's penalised parameters that require grad (a
    None grad becomes zeros first); the penalty value, or None when no parameter is penalised.
    The `add_penalty_grad_` of unsharded regularizers (SI, EWC)."""
    params, theta_star, omega = regularizer.penalty_terms()
    keep = [i for i, p in enumerate(params) if p.requires_grad]
    if not keep:
        return None
    for i in keep:
        if params[i].grad is None:
            params[i].grad = torch.zeros_like(params[i])
    return ops.penalty_and_grad_([params[i] for i in keep], [params[i].grad for i in keep],
                                 [theta_star[i] for i in keep], [omega[i] for i in keep],
                                 regularizer.penalty_strength, backend=regularizer.penalty_backend)


def _check_regularizer(regularizer: Any) -> None:
    """TypeError naming what `regularizer` lacks of PenaltyRegularizer (None is fine)."""
    if regularizer is None:
        return
    missing = [name for name in ("penalty_terms", "penalty_strength", "penalty_backend")
               if not hasattr(regularizer, name)]
    if not missing and not callable(regularizer.penalty_terms):
        missing = ["penalty_terms (not callable)"]
    if missing:
        raise TypeError(f"regularizer must implement mas_fast.optim.PenaltyRegularizer (e.g. a mas_fast.MAS) "
                        f"or be None; {type(regularizer).__name__} lacks: {', '.join(missing)}")


def _check_number(name: str, value: Any, low: float = 0.0, high: Optional[float] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


class _MASOptimizer(torch.optim.Optimizer):
    """Splits each param group into MAS-covered and plain tensors and calls `_step_tensors`."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], regularizer: Optional[PenaltyRegularizer],
                 backend: Optional[str]) -> None:
        _check_regularizer(regularizer)
        self.regularizer = regularizer
        self.backend = ops.check_backend(backend if backend is not None else
                                         regularizer.penalty_backend if regularizer is not None else "auto")
        super().__init__(params, defaults)
        # Updated in place, so that a torch.compile'd step() updates it too; on the parameters'
        # device, so that recording it never waits for the GPU.
        first = next((p for group in self.param_groups for p in group["params"]), None)
        self._last_penalty = torch.zeros((), dtype=torch.float64, device=None if first is None else first.device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, checking a group's own `penalty_step` before it joins."""
        check_penalty_step(param_group.get("penalty_step", self.defaults.get("penalty_step", "gradient")))
        super().add_param_group(param_group)

    @property
    def last_penalty(self) -> Tensor:
        """λΣΩ(θ−θ*)² of the covered parameters stepped, at θ before the last step (float64;
        0 before the first step or without consolidated MAS state)."""
        return self._last_penalty

    def _penalty_terms(self) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """Covered parameter → (θ*, Ω), empty before the first consolidation."""
        if self.regularizer is None:
            return {}
        params, theta_star, omega = self.regularizer.penalty_terms()
        return {p: (t, o) for p, t, o in zip(params, theta_star, omega)}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One step; `last_penalty` becomes λΣΩ(θ−θ*)² of the covered parameters stepped here."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        terms = self._penalty_terms()
        lam = self.regularizer.penalty_strength if self.regularizer is not None else 0.0
        values: list[Tensor] = []
        for group in self.param_groups:
            covered: list[Tensor] = []
            plain: list[Tensor] = []
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p in terms and p.requires_grad:
                    covered.append(p)
                elif p.grad is not None:
                    plain.append(p)
            if covered:
                # FSDP2 (DTensor) parameters step on their shards; their penalty is summed over ranks.
                sharded, whole = split_by_sharding(range(len(covered)), covered)
                for index, total in ((sharded, sum_over_ranks), (whole, lambda v: v)):
                    part = [covered[i] for i in index]
                    if part:
                        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in part]
                        values += map(total, self._step_tensors(group, part, grads, [terms[p][0] for p in part],
                                                                [terms[p][1] for p in part], lam))
            if plain:
                self._step_tensors(group, plain, [p.grad for p in plain], [], [], 0.0)
        if values:
            self._last_penalty.copy_(sum(values))
        else:
            self._last_penalty.zero_()
        return loss

    def _step_tensors(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                      theta_star: list[Tensor], omega: list[Tensor], lam: float) -> list[Tensor]:
        """Steps `params` (θ*/Ω empty: no penalty); returns the penalty value(s) of the call(s)."""
        raise NotImplementedError


class SGD(_MASOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize) + MAS penalty.

    Args: as torch.optim.SGD, plus `regularizer` (a mas_fast.MAS, or any PenaltyRegularizer,
    whose penalty is folded in, or None for a plain SGD), `penalty_step` ("gradient": the step
    on g + 2λΩ(θ−θ*), equal to `loss + mas.penalty()`; "proximal": θ ← θ* + (θ' − θ*) /
    (1 + 2·lr·λΩ) after the loss-only step θ', the momentum buffer holding the loss direction
    only) and `backend` (default: the regularizer's, else "auto").
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 regularizer: Optional[PenaltyRegularizer] = None, penalty_step: str = "gradient",
                 backend: Optional[str] = None) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                            ("weight_decay", weight_decay)):
            _check_number(name, value)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening 0")
        check_penalty_step(penalty_step)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), maximize=bool(maximize), penalty_step=penalty_step)
        super().__init__(params, defaults, regularizer, backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state_dicts of older torch.optim versions
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("penalty_step", "gradient")

    def _step_tensors(self, group, params, grads, theta_star, omega, lam):
        config = ops.SGDConfig(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                               weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                               maximize=group["maximize"], penalty_step=group["penalty_step"])
        if config.momentum == 0:
            return [on_local_shards(ops.sgd_step_)(params, grads, [], theta_star, omega, lam, config,
                                                   backend=self.backend)]
        # torch.optim starts a buffer as a copy of the first gradient: one call for the
        # tensors with a buffer, one for those getting theirs now.
        values = []
        for init in (False, True):
            index = [i for i, p in enumerate(params) if ("momentum_buffer" not in self.state[p]) == init]
            if not index:
                continue
            if init:
                for i in index:
                    self.state[params[i]]["momentum_buffer"] = torch.empty_like(params[i])
            values.append(on_local_shards(ops.sgd_step_)(
                [params[i] for i in index], [grads[i] for i in index],
                [self.state[params[i]]["momentum_buffer"] for i in index],
                [theta_star[i] for i in index] if theta_star else [],
                [omega[i] for i in index] if omega else [], lam, config, init_buffers=init,
                backend=self.backend))
        return values


class Adam(_MASOptimizer):
    """torch.optim.Adam (amsgrad, weight_decay, decoupled_weight_decay, maximize) + MAS penalty.

    Args: as torch.optim.Adam, plus `regularizer`, `penalty_step` and `backend` (see SGD). With
    "proximal", the moments see the loss gradient only and the penalty's proximal map follows
    the Adam update, decoupled from it as AdamW decouples weight decay.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 regularizer: Optional[PenaltyRegularizer] = None, penalty_step: str = "gradient",
                 backend: Optional[str] = None) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            _check_number(name, value)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], high=1.0)
        _check_number("betas[1]", betas[1], high=1.0)
        check_penalty_step(penalty_step)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=bool(maximize), decoupled_weight_decay=bool(decoupled_weight_decay),
                        penalty_step=penalty_step)
        super().__init__(params, defaults, regularizer, backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state_dicts of older torch.optim versions
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", isinstance(self, AdamW))
            group.setdefault("penalty_step", "gradient")
            for p in group["params"]:
                s = self.state.get(p, {})
                if s and not torch.is_tensor(s["step"]):
                    s["step"] = torch.tensor(float(s["step"]), dtype=_step_dtype())

    def _state(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:  # torch.optim's layout: a CPU step counter, moments shaped like p
            state["step"] = torch.tensor(0.0, dtype=_step_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_tensors(self, group, params, grads, theta_star, omega, lam):
        amsgrad = group["amsgrad"]
        states = [self._state(p, amsgrad) for p in params]
        beta1, beta2 = group["betas"]
        return [on_local_shards(ops.adam_step_)(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states],
            theta_star, omega, lam, ops.AdamConfig(
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
                maximize=group["maximize"], penalty_step=group["penalty_step"]), backend=self.backend)]


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) + MAS penalty.

    Args: as torch.optim.AdamW, plus `regularizer`, `penalty_step` and `backend` (see SGD, Adam).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, regularizer: Optional[PenaltyRegularizer] = None,
                 penalty_step: str = "gradient", backend: Optional[str] = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, regularizer=regularizer, penalty_step=penalty_step,
                         backend=backend)


def _step_dtype() -> torch.dtype:
    """torch.optim's step-counter dtype: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
