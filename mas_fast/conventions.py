"""Whose MAS: each published implementation's scaling of Ω, as one setting of `MAS`.

Each library forms importance from another objective, normalises it differently, merges
tasks differently and scales the penalty differently, so a λ tuned with one means nothing
in another. `MAS(model, convention=...)` reproduces one of them; docs/conventions.md gives
the formulas, the sources and how each λ relates to the paper's.

A convention fixes:
- the objective of the importance pass (output norm or the library's own batch loss, eval or
  train mode) and the paths it allows (per-batch conventions: mode="batch" only);
- how one batch of n samples enters the task's running mean: |∇ objective| times a factor,
  with a weight (n: a mean over samples; 1: a mean over batches);
- the merge across tasks and the factor of λ in the penalty.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .importance import MODES, NORMS, Objective
from .ops.policy import acc_dtype

Tensor = torch.Tensor
MERGES = ("sum", "alpha")


def _hsu_loss(F: Tensor) -> Tensor:
    """Mean over the batch and the outputs of F² (Hsu et al.: `pred.pow_(2); pred.mean()`)."""
    return F.to(acc_dtype(F.dtype)).pow(2).mean()


def _avalanche_loss(F: Tensor) -> Tensor:
    """Avalanche: `torch.norm(out, p="fro", dim=1).pow(2).mean()`."""
    return torch.norm(F.to(acc_dtype(F.dtype)), p="fro", dim=1).pow(2).mean()


def _facil_loss(F: Tensor) -> Tensor:
    """FACIL: `torch.norm(outputs, p=2, dim=1).mean()` — the unsquared norm."""
    return torch.norm(F.to(acc_dtype(F.dtype)), p=2, dim=1).mean()


def _per_sample(n: int) -> tuple[float, int]:
    return 1.0, n


def _per_batch(n: int) -> tuple[float, int]:
    return 1.0, 1


@dataclass(frozen=True)
class Convention:
    """One library's MAS (see the module docstring).

    modes / norms / merges: what it allows; the first of each is its default.
    batch_loss, train: its importance objective (None: Σ_k f(F_k) with the chosen norm).
    weigh: n (samples in a batch) → (factor on the batch's |∇ objective|, its weight in the
        task's mean): Ω_task = Σ_b factor_b |∇_b| / Σ_b weight_b.
    alpha_from_zero: with merge="alpha", Ω starts at zero, so the first task is mixed too.
    new_unmixed: with merge="alpha", a parameter new to Ω takes its task's Ω unmixed.
    penalty_factor: the penalty is penalty_factor · λ Σ Ω (θ − θ*)².
    source: repository, file and commit the convention was read from.
    """

    name: str
    modes: tuple[str, ...]
    norms: tuple[str, ...]
    merges: tuple[str, ...]
    weigh: Callable[[int], tuple[float, int]]
    source: str
    batch_loss: Optional[Callable[[Tensor], Tensor]] = None
    train: bool = False
    alpha_from_zero: bool = False
    new_unmixed: bool = False
    penalty_factor: float = 1.0

    def objective(self, norm: str) -> Objective:
        return Objective(norm=norm, batch_loss=self.batch_loss, train=self.train)

    def resolve(self, mode: Optional[str], norm: Optional[str], merge: Optional[str]) -> tuple[str, str, str]:
        """(mode, norm, merge): the given ones, checked against this convention, or its defaults."""
        chosen = {}
        for arg, value, allowed, every in (("mode", mode, self.modes, MODES), ("norm", norm, self.norms, NORMS),
                                           ("merge", merge, self.merges, MERGES)):
            if value is None:
                chosen[arg] = allowed[0]
            elif value not in every:
                raise ValueError(f"{arg} must be one of {every}, got {value!r}")
            elif value not in allowed:
                raise ValueError(f"{arg}={value!r} is not part of convention={self.name!r}, which allows "
                                 f"{arg} in {allowed}")
            else:
                chosen[arg] = value
        if chosen["mode"] == "local" and chosen["norm"] != "l2":
            raise ValueError(f"norm={chosen['norm']!r} cannot be used with mode='local' (each layer's own "
                             "squared L2 norm); use mode='per_sample' or 'batch'")
        return chosen["mode"], chosen["norm"], chosen["merge"]


_AUTHORS = "rahafaljundi/MAS-Memory-Aware-Synapses @ 604625ed, MAS_to_be_published/MAS_utils/MAS_based_Training.py"
_FACIL = "mmasana/FACIL @ 66e3e8ed, src/approach/mas.py"
_HSU = "GT-RIPL/Continual-Learning-Benchmark @ 40183815, agents/regularization.py"
_AVALANCHE = "ContinualAI/avalanche @ 93a71ad9, avalanche/training/plugins/mas.py"

CONVENTIONS: dict[str, Convention] = {c.name: c for c in (
    # the paper (eq. 2-4): Ω = (1/N) Σ_k |∂f(F(x_k))/∂θ|, eval mode, importances add up
    Convention("paper", MODES, NORMS, MERGES, _per_sample, "Aljundi et al., ECCV 2018, eq. 2-4"),
    # the official code: per batch, |∇ Σ_{k∈b} f(F_k)| / |b| averaged over batches, eval mode
    Convention("authors", ("batch",), NORMS, ("sum",), lambda n: (1.0 / n, 1), _AUTHORS),
    # FACIL: |b|·|∇ mean_b ‖F_k‖₂| / N, train mode, α-mix from Ω = 0, penalty λ/2
    Convention("facil", ("batch",), ("l2",), ("alpha",), lambda n: (float(n), n), _FACIL, _facil_loss,
               train=True, alpha_from_zero=True, penalty_factor=0.5),
    # Hsu et al.: |∇ mean over batch and outputs of F²| averaged over batches, eval mode, summed
    Convention("hsu", ("batch",), ("l2",), ("sum",), _per_batch, _HSU, _hsu_loss),
    # Avalanche: |∇ mean_b ‖F_k‖²| averaged over batches, train mode, α-mix (first task sets Ω)
    Convention("avalanche", ("batch",), ("l2",), ("alpha",), _per_batch, _AVALANCHE, _avalanche_loss,
               train=True, new_unmixed=True),
)}


def convention(name: str) -> Convention:
    """The convention called `name` (ValueError naming the choices otherwise)."""
    if name not in CONVENTIONS:
        raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {name!r}")
    return CONVENTIONS[name]


def class_proportional_alpha(classes_per_task: Sequence[int]) -> float:
    """FACIL's `alpha=-1`: α for the task that ends now, given the number of classes of every
    task so far (this one last): the share of the classes seen before it.

    Set `mas.alpha = class_proportional_alpha(classes)` before each `consolidate()`.
    """
    counts = list(classes_per_task)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in counts):
        raise ValueError(f"classes_per_task must be a non-empty sequence of positive ints, got {classes_per_task!r}")
    return sum(counts[:-1]) / sum(counts)


__all__ = ["CONVENTIONS", "Convention", "MERGES", "class_proportional_alpha", "convention"]
