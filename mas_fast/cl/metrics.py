"""Continual-learning metrics of an accuracy matrix R (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

R[i][j] is the accuracy on task j after training on tasks 0..i (a T×T matrix; entries
above the diagonal, tasks not yet trained, are measured but unused by these metrics).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _square(R: Matrix) -> np.ndarray:
    a = np.asarray(R, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square T×T with T >= 1, got shape {a.shape}")
    return a


def average_accuracy(R: Matrix) -> float:
    """ACC = (1/T) Σ_j R[T-1][j]: mean accuracy over all tasks after the last one."""
    a = _square(R)
    return float(a[-1].mean())


def backward_transfer(R: Matrix) -> float:
    """BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] − R[j][j]); negative means forgetting (0 for T = 1)."""
    a = _square(R)
    T = a.shape[0]
    return float(np.mean(a[-1, :-1] - np.diag(a)[:-1])) if T > 1 else 0.0


def forgetting(R: Matrix) -> float:
    """F = 1/(T-1) Σ_{j<T-1} (max_{j<=l<T-1} R[l][j] − R[T-1][j]): the drop from each task's
    best accuracy since it was learned (0 for T = 1)."""
    a = _square(R)
    T = a.shape[0]
    if T == 1:
        return 0.0
    best = np.array([a[j:T - 1, j].max() for j in range(T - 1)])
    return float(np.mean(best - a[-1, :-1]))


def seen_task_accuracy(R: Matrix) -> list[float]:
    """After each task i: the mean accuracy over tasks 0..i (the accuracy-over-tasks curve)."""
    a = _square(R)
    return [float(a[i, :i + 1].mean()) for i in range(a.shape[0])]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def final_loss(R: Matrix) -> float:
    """(1/T) Σ_j R[T-1][j] for a loss matrix: mean loss over all tasks after the last one."""
    return average_accuracy(R)


def loss_forgetting(R: Matrix) -> float:
    """For a loss matrix: 1/(T-1) Σ_{j<T-1} (R[T-1][j] − min_{j<=l<T-1} R[l][j]), the rise of
    each earlier task's loss above its best since it was learned (0 for T = 1)."""
    a = _square(R)
    T = a.shape[0]
    if T == 1:
        return 0.0
    best = np.array([a[j:T - 1, j].min() for j in range(T - 1)])
    return float(np.mean(a[-1, :-1] - best))


METRICS = {"acc": average_accuracy, "bwt": backward_transfer, "forgetting": forgetting}
LOSS_METRICS = {"final_loss": final_loss, "forgetting": loss_forgetting}


def summarise(R: Matrix, metric: str = "accuracy") -> dict[str, float]:
    """ACC, BWT and forgetting of one run; for a loss matrix (metric "loss"), the final mean
    loss and the forgetting (loss rise) of the earlier tasks."""
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    return {name: fn(R) for name, fn in (METRICS if metric == "accuracy" else LOSS_METRICS).items()}
