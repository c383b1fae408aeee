"""The compared methods, behind one small interface the training loop drives.

- finetune: plain sequential training (the lower bound).
- joint: after task t, trains on the union of tasks 1..t (the upper bound).
- mas_per_sample / mas_batch / mas_local: mas_fast.MAS in each importance mode.
- ewc_online: online EWC with the exact per-sample diagonal Fisher (cl/ewc.py).
- si: Synaptic Intelligence (cl/si.py), its path integral recorded around every step.

`make_method` also builds VARIANTS, which the demo does not run, for the comparison with Hsu
et al. 2018 (cl/hsu2018.py, docs/baselines.md): "mas_hsu", MAS in their convention (importance
per batch of 128, their batch size), and "ewc", EWC with one penalty per task (cl/ewc.py).

The penalty gradient is added after `loss.backward()` (`add_penalty_grad_`), so the time
it costs is measured on its own; importance is computed at the end of each task from the
task's training images (labels only for EWC's Fisher).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..regularizer import MAS
from .ewc import EWC, OnlineEWC
from .si import SynapticIntelligence

Tensor = torch.Tensor
IMPORTANCE_BATCH = 256
METHODS = ("finetune", "joint", "mas_per_sample", "mas_batch", "mas_local", "ewc_online", "si")
REGULARIZED = tuple(m for m in METHODS if m not in ("finetune", "joint"))
VARIANTS = ("mas_hsu", "ewc")
HSU_IMPORTANCE_BATCH = 128
# The text scenario trains its first task once for all methods, without SI's path integral.
TEXT_METHODS = tuple(m for m in METHODS if m != "si")


class Head:
    """Selects the output units of the current task: F for MAS, the logits for EWC's loss."""

    def __init__(self, columns: Tensor) -> None:
        self.columns = columns

    def __call__(self, output: Tensor) -> Tensor:
        return output.index_select(1, self.columns)


class Method:
    """Fine-tuning: no penalty, nothing to do between tasks."""

    joint = False       # trains on the union of the tasks seen so far
    penalised = False   # adds a penalty gradient in every step

    def add_penalty_grad_(self) -> None:
        """Add the penalty's gradient to the parameters' `.grad` (after `loss.backward()`)."""

    def after_step(self) -> None:
        """Called after every `opt.step()` (SI records the step's parameter change)."""

    def end_task(self, x: Tensor, y: Tensor, columns: Tensor) -> None:
        """Consolidate after a task, from its float images `x` and labels `y`."""

    @property
    def importance(self) -> Mapping[str, Tensor]:
        """Per-parameter importance (Ω or Fisher) accumulated so far; empty for no penalty."""
        return {}


class Joint(Method):
    joint = True


class MASMethod(Method):
    penalised = True

    def __init__(self, model: nn.Module, lambda_: float, mode: str, backend: str, convention: str = "paper",
                 importance_batch: int = IMPORTANCE_BATCH) -> None:
        self.head = Head(torch.zeros(0, dtype=torch.long))
        self.mas = MAS(model, lambda_=lambda_, mode=mode, output_fn=self.head, backend=backend,
                       convention=convention)
        self.importance_batch = importance_batch

    def add_penalty_grad_(self) -> None:
        self.mas.add_penalty_grad_()

    def end_task(self, x: Tensor, y: Tensor, columns: Tensor) -> None:
        self.head.columns = columns
        self.mas.consolidate(x.split(self.importance_batch), progress=False)

    @property
    def importance(self) -> Mapping[str, Tensor]:
        return self.mas.importance


class EWCMethod(Method):
    """Online EWC, or EWC with one penalty per task (`per_task`)."""

    penalised = True

    def __init__(self, model: nn.Module, lambda_: float, backend: str, per_task: bool = False) -> None:
        self.head = Head(torch.zeros(0, dtype=torch.long))
        self.ewc = (EWC if per_task else OnlineEWC)(model, lambda_, self._loss, backend=backend)

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.head(output), y, reduction="sum")

    def add_penalty_grad_(self) -> None:
        self.ewc.add_penalty_grad_()

    def end_task(self, x: Tensor, y: Tensor, columns: Tensor) -> None:
        self.head.columns = columns
        self.ewc.consolidate(zip(x.split(IMPORTANCE_BATCH), y.split(IMPORTANCE_BATCH)))

    @property
    def importance(self) -> Mapping[str, Tensor]:
        return self.ewc.fisher


class SIMethod(Method):
    """Synaptic Intelligence: `add_penalty_grad_` first snapshots θ and the loss gradient."""

    penalised = True

    def __init__(self, model: nn.Module, c: float, backend: str) -> None:
        self.si = SynapticIntelligence(model, c=c, backend=backend)

    def add_penalty_grad_(self) -> None:
        self.si.begin_step()
        self.si.add_penalty_grad_()

    def after_step(self) -> None:
        self.si.end_step()

    def end_task(self, x: Tensor, y: Tensor, columns: Tensor) -> None:
        self.si.consolidate()

    @property
    def importance(self) -> Mapping[str, Tensor]:
        return self.si.importance


def make_method(name: str, model: nn.Module, lambda_: float = 0.0, backend: str = "auto") -> Method:
    """The method `name` attached to `model` (λ is used by the regularised methods only)."""
    if name == "finetune":
        return Method()
    if name == "joint":
        return Joint()
    if name.startswith("mas_") and name in METHODS:
        return MASMethod(model, lambda_, name[len("mas_"):], backend)
    if name == "ewc_online":
        return EWCMethod(model, lambda_, backend)
    if name == "si":
        return SIMethod(model, lambda_, backend)
    if name == "ewc":
        return EWCMethod(model, lambda_, backend, per_task=True)
    if name == "mas_hsu":
        return MASMethod(model, lambda_, "batch", backend, convention="hsu", importance_batch=HSU_IMPORTANCE_BATCH)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS + VARIANTS}")
