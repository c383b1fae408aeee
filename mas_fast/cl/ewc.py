"""Online EWC (Schwarz et al. 2018) and EWC (Kirkpatrick et al. 2017) with an exact
per-sample diagonal Fisher.

Fisher of one task: F = (1/N) Σ_k (∂ℓ_k/∂θ)², ℓ_k the loss of sample k with its label (the
empirical Fisher). It reuses mas_fast's capture machinery: one forward and one backward of
Σ_k ℓ_k with the hooks of mas_fast.importance stream every Linear layer's input X and
output-gradient Δ. A Linear per-sample gradient is rank one, g_k = δ_k x_kᵀ, so
Σ_k g_k² = (Δ∘Δ)ᵀ(X∘X): the MAS kernel Σ|Δ|ᵀ|X| on squared operands (|·| is the identity
on squares), one GEMM on whichever backend mas_fast picks. Every other parameter goes
through the torch.func per-sample fallback with a squared statistic.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .. import ops
from ..importance import batch_size, sites_of
from ..importance.capture import Site, eval_mode, stream_deltas
from ..importance.fallback import model_per_sample
from ..importance.rules import linear_rule
from ..ops.policy import acc_dtype
from ..optim import add_penalty_grad
from ..regularizer import check_lambda

Tensor = torch.Tensor
LossFn = Callable[[Any, Tensor], Tensor]  # (model output, labels) -> loss summed over samples


def fisher_sums(model: nn.Module, x: Tensor, y: Tensor, params: dict[str, Tensor], loss_fn: LossFn,
                backend: str = "auto") -> dict[str, Tensor]:
    """Σ_k (∂ℓ_k/∂θ)² over the samples of one batch, for every parameter in `params`.

    `loss_fn(output, y)` must return the loss *summed* over the samples. Runs in eval mode
    (each module's mode restored) and never touches `.grad`; results are float32 (float64
    for float64 parameters).
    """
    batch = batch_size(x)
    if batch == 0:
        raise ValueError("the input batch is empty (0 samples)")
    sums: dict[str, Tensor] = {}
    inexact: set[str] = set()  # reached by the loss, but no squared rule: fallback

    def squared_linear(site: Site, delta: Tensor) -> None:
        if site.rule is not linear_rule or site.x.dim() != 2:
            inexact.update(site.params.values())
            return
        d2 = delta.to(acc_dtype(delta.dtype)).square()
        if "weight" in site.params:
            x2 = site.x.to(acc_dtype(site.x.dtype)).square()
            sums[site.params["weight"]] = ops.abs_matmul(d2, x2, backend=backend)
        if "bias" in site.params:
            sums[site.params["bias"]] = ops.per_sample_abs_sum(d2.unsqueeze(1), backend=backend)

    with eval_mode(model):
        sites = sites_of(model, params, "per_sample", batch)
        others = stream_deltas(sites, lambda: loss_fn(model(x), y), squared_linear, params) | inexact
        if others:
            sums.update(model_per_sample(model, x, {n: params[n] for n in others}, loss_fn, batch, extra=y,
                                         statistic=torch.square))
    return {n: sums[n] if n in sums else torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
            for n, p in params.items()}


class OnlineEWC:
    """Online EWC: penalty (λ/2) Σ F (θ − θ*)², with F ← γ F + F_task after each task.

    Args:
        model: the network.
        lambda_: λ, the penalty strength.
        loss_fn: `(output, labels) -> loss summed over the samples`; its per-sample
            gradients define the Fisher.
        gamma: γ, the decay of the old Fisher (1: plain accumulation).
        backend: mas_fast.ops backend for the Fisher GEMMs and the penalty.
    """

    def __init__(self, model: nn.Module, lambda_: float, loss_fn: LossFn, gamma: float = 1.0,
                 backend: str = "auto") -> None:
        check_lambda(lambda_)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
        self.model, self.lambda_, self.gamma = model, float(lambda_), float(gamma)
        self.loss_fn = loss_fn
        self.backend = ops.check_backend(backend)
        self._fisher: dict[str, Tensor] = {}
        self._theta_star: dict[str, Tensor] = {}

    @property
    def fisher(self) -> Mapping[str, Tensor]:
        """The accumulated diagonal Fisher by parameter name (read-only mapping)."""
        return MappingProxyType(self._fisher)

    def consolidate(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """End a task: F_task from the (inputs, labels) `batches`, merge it, snapshot θ*.

        Nothing changes if a batch fails or there are no samples.
        """
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        total: dict[str, Tensor] = {}
        count = 0
        for x, y in batches:
            for n, s in fisher_sums(self.model, x, y, params, self.loss_fn, self.backend).items():
                total[n] = total[n] + s if n in total else s
            count += batch_size(x)
        if count == 0:
            raise ValueError("nothing to consolidate: the batches held no samples")
        theta = {n: p.detach().to(acc_dtype(p.dtype), copy=True) for n, p in params.items()}
        self._merge({n: s / count for n, s in total.items()}, theta)

    def _merge(self, task: dict[str, Tensor], theta: dict[str, Tensor]) -> None:
        """F ← γ F + F_task, θ* ← θ."""
        fisher = dict(task)
        for n, old in self._fisher.items():
            fisher[n] = self.gamma * old + fisher[n] if n in fisher else self.gamma * old
        self._fisher = fisher
        self._theta_star = {n: theta[n] for n in fisher}

    def penalty_terms(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Aligned lists (parameters, θ*, F), empty before the first consolidation (the fused
        optimizers' protocol, mas_fast.optim.PenaltyRegularizer)."""
        named = dict(self.model.named_parameters())
        names = list(self._fisher)
        return [named[n] for n in names], [self._theta_star[n] for n in names], [self._fisher[n] for n in names]

    @property
    def penalty_strength(self) -> float:
        """λ/2, the factor of Σ F (θ − θ*)²."""
        return self.lambda_ / 2

    @property
    def penalty_backend(self) -> str:
        """The backend of the penalty and of the fused optimizer steps."""
        return self.backend

    def add_penalty_grad_(self) -> Tensor:
        """After `loss.backward()`: p.grad += λ F (θ − θ*); returns the penalty value."""
        value = add_penalty_grad(self)
        return torch.zeros(()) if value is None else value


class EWC(OnlineEWC):
    """EWC (Kirkpatrick et al. 2017): one penalty per task, (λ/2) Σ_t F_t (θ − θ*_t)².

    Σ_t F_t (θ − θ*_t)² = F̄ (θ − θ̄*)² + C, with F̄ = Σ_t F_t, θ̄* = Σ_t F_t θ*_t / F̄ and
    C = Σ_t F_t θ*_t² − F̄ θ̄*² constant in θ: one Fisher and one anchor give the same gradient,
    on the same kernels as online EWC. The penalty values returned (`add_penalty_grad_`, the
    fused optimizers' `last_penalty`) are (λ/2) F̄ (θ − θ̄*)²: the sum of the task penalties
    minus the constant (λ/2) C. Where F̄ = 0 the anchor is the latest θ* (no penalty there).
    `fisher` is F̄ and `theta_star` θ̄*.

    Args: as OnlineEWC, without γ.
    """

    def __init__(self, model: nn.Module, lambda_: float, loss_fn: LossFn, backend: str = "auto") -> None:
        super().__init__(model, lambda_, loss_fn, gamma=1.0, backend=backend)
        self._weighted: dict[str, Tensor] = {}  # Σ_t F_t θ*_t

    @property
    def theta_star(self) -> Mapping[str, Tensor]:
        """θ̄*, the Fisher-weighted mean of the tasks' θ* (read-only mapping)."""
        return MappingProxyType(self._theta_star)

    def _merge(self, task: dict[str, Tensor], theta: dict[str, Tensor]) -> None:
        fisher, weighted = dict(self._fisher), dict(self._weighted)
        for n, f in task.items():
            fisher[n] = fisher[n] + f if n in fisher else f
            weighted[n] = weighted[n] + f * theta[n] if n in weighted else f * theta[n]
        anchor = {n: torch.where(fisher[n] > 0, weighted[n] / fisher[n],
                                 theta[n] if n in theta else self._theta_star[n]) for n in fisher}
        self._fisher, self._weighted, self._theta_star = fisher, weighted, anchor
