"""The function of the output whose gradient a batch's importance takes.

Per sample (the paper's form) the objective is Σ_k f(F_k) with f an output norm:
- "l2": ‖F_k‖₂² (the paper, the default);
- "l1": ‖F_k‖₁ (the authors' code's L1 option; Δ = sign(F) through the same rules);
- "vector": each output F_{k,i} (i along dimension 1 of F) on its own, |∂·| summed over i
  (the authors' code's "gradient vector" option: one backward per output).

A library that defines importance per batch may instead give its own loss of the whole batch
output (`Objective.batch_loss`), e.g. the mean over the batch of ‖F_k‖₂.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..ops.policy import acc_dtype

Tensor = torch.Tensor
NORMS = ("l2", "l1", "vector")


def squared_norm(output: Any) -> Tensor:
    """Σ ‖leaf‖² over the tensor leaves of a (possibly nested) output, in float32 or wider."""
    leaves = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    return sum(t.to(acc_dtype(t.dtype)).square().sum() for t in leaves)


def abs_norm(F: Tensor) -> Tensor:
    """Σ |F| (Σ_k ‖F_k‖₁), in float32 or wider."""
    return F.to(acc_dtype(F.dtype)).abs().sum()


def output_component(i: int) -> Callable[[Tensor], Tensor]:
    """F ↦ Σ F[:, i] (every sample's i-th output along dimension 1), in float32 or wider."""
    return lambda F: F[:, i].to(acc_dtype(F.dtype)).sum()


@dataclass(frozen=True)
class Objective:
    """What one importance pass differentiates.

    norm: the per-sample output norm (NORMS) when `batch_loss` is None.
    batch_loss: a library's own loss of one batch's output F (per-batch conventions only).
    train: run the pass in train mode (BatchNorm on batch statistics, dropout active),
        as libraries that compute importance in train mode do; eval mode otherwise.
    """

    norm: str = "l2"
    batch_loss: Optional[Callable[[Tensor], Tensor]] = None
    train: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    @property
    def per_sample_form(self) -> bool:
        """The objective is a sum of per-sample terms (so the per-sample paths apply)."""
        return self.batch_loss is None and not self.train

    def parts(self, F: Optional[Tensor]) -> list[Callable[[Tensor], Tensor]]:
        """The scalar functions of the batch output whose |gradients| add up to the importance:
        one, or one per output for norm="vector" (which needs the output F, for its size)."""
        if self.batch_loss is not None:
            return [self.batch_loss]
        if self.norm == "vector":
            if F.dim() < 2:
                raise ValueError(f"norm='vector' needs an output with a dimension 1 of outputs, got shape "
                                 f"{tuple(F.shape)}")
            return [output_component(i) for i in range(F.shape[1])]
        return [squared_norm if self.norm == "l2" else abs_norm]


PAPER = Objective()


@contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Train mode for the pass (a train-mode objective), each module's flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training

__all__ = ["NORMS", "Objective", "PAPER", "abs_norm", "output_component", "squared_norm", "train_mode"]
