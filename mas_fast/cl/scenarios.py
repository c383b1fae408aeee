"""The standard continual-learning scenarios on MNIST (Hsu et al. 2018; van de Ven & Tolias 2019).

- split-task:   Split-MNIST, 5 tasks of 2 digits, task-incremental: each task has its own
                2-unit head (columns 2t, 2t+1 of a 10-unit output layer), the task id is known.
- split-domain: Split-MNIST, domain-incremental: one shared 2-unit head, the label is the
                digit's position in its pair (even / odd), the task id is not used.
- permuted:     Permuted-MNIST, domain-incremental: every task sees all ten digits with a
                fixed pixel permutation (task 1: the identity), one shared 10-unit head.

Every sample carries its task index; `Scenario.columns[t]` lists the output units task t
reads, so losses, evaluation and importance all select `logits.gather(1, columns[task])`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .data import Digits, Splits

Tensor = torch.Tensor
PIXELS = 784
SPLIT_PAIRS = 5


@dataclass(frozen=True)
class TaskData:
    """Images (N, 784) uint8, labels within the task's columns, and each sample's task index."""

    x: Tensor
    y: Tensor
    task: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> "TaskData":
        return TaskData(self.x.to(device), self.y.to(device), self.task.to(device))

    def inputs(self, index: Optional[Tensor] = None) -> Tensor:
        """Float images in [0, 1] (all samples, or those at `index`)."""
        x = self.x if index is None else self.x[index]
        return x.float().div_(255.0)

    @staticmethod
    def concat(parts: list["TaskData"]) -> "TaskData":
        return TaskData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                        torch.cat([p.task for p in parts]))


@dataclass(frozen=True)
class Task:
    name: str
    train: TaskData
    eval: TaskData  # test digits (or validation digits during the λ search)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    outputs: int     # units of the model's output layer
    columns: Tensor  # (tasks, k) output units read by each task
    tasks: list[Task]

    def to(self, device: torch.device) -> "Scenario":
        tasks = [Task(t.name, t.train.to(device), t.eval.to(device)) for t in self.tasks]
        return Scenario(self.name, self.title, self.outputs, self.columns.to(device), tasks)


TITLES = {
    "split-task": "Split-MNIST, task-incremental (multi-head)",
    "split-domain": "Split-MNIST, domain-incremental (shared head)",
    "permuted": "Permuted-MNIST, domain-incremental",
}
SCENARIOS = tuple(TITLES)


def _task_data(d: Digits, y: Tensor, t: int) -> TaskData:
    return TaskData(d.x, y, torch.full_like(y, t))


def _pair(d: Digits, t: int) -> TaskData:
    keep = (d.y == 2 * t) | (d.y == 2 * t + 1)
    return _task_data(d.subset(keep), d.y[keep] - 2 * t, t)


def permutations(num_tasks: int, seed: int) -> list[Tensor]:
    """Pixel permutations of Permuted-MNIST: identity first, then random ones drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.arange(PIXELS)] + [torch.randperm(PIXELS, generator=g) for _ in range(num_tasks - 1)]


def make_scenario(name: str, splits: Splits, num_tasks: int, seed: int, evaluate_on: str = "test") -> Scenario:
    """Build scenario `name` with `num_tasks` tasks; `seed` draws the permutations.

    `evaluate_on="val"` evaluates on the validation digits (the λ search), "test" on the
    held-out test digits.
    """
    if name not in TITLES:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    if evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', got {evaluate_on!r}")
    limit = SPLIT_PAIRS if name.startswith("split") else None
    if num_tasks < 1 or (limit is not None and num_tasks > limit):
        raise ValueError(f"{name} needs 1..{limit or 'any'} tasks, got {num_tasks}")
    held = splits.test if evaluate_on == "test" else splits.val
    tasks = []
    if name.startswith("split"):
        for t in range(num_tasks):
            digits = f"{2 * t}/{2 * t + 1}"
            tasks.append(Task(f"{digits}", _pair(splits.train, t), _pair(held, t)))
        if name == "split-task":
            columns, outputs = torch.arange(2 * num_tasks).view(num_tasks, 2), 2 * num_tasks
        else:
            columns, outputs = torch.tensor([[0, 1]]).expand(num_tasks, 2).clone(), 2
    else:
        for t, perm in enumerate(permutations(num_tasks, seed)):
            train = Digits(splits.train.x[:, perm], splits.train.y)
            evaluation = Digits(held.x[:, perm], held.y)
            tasks.append(Task(f"perm {t + 1}", _task_data(train, train.y, t), _task_data(evaluation, evaluation.y, t)))
        columns, outputs = torch.arange(10).expand(num_tasks, 10).clone(), 10
    return Scenario(name, TITLES[name], outputs, columns, tasks)
