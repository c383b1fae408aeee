"""The standard continual-learning scenarios on MNIST (Hsu et al. 2018; van de Ven & Tolias 2019).

- split-task:   Split-MNIST, 5 tasks of 2 digits, task-incremental: each task has its own
                2-unit head (columns 2t, 2t+1 of a 10-unit output layer), the task id is known.
- split-domain: Split-MNIST, domain-incremental: one shared 2-unit head, the label is the
                digit's position in its pair (even / odd), the task id is not used.
- split-class:  Split-MNIST, class-incremental (Hsu et al. 2018): one 10-unit head, the label
                is the digit; while task t trains, and when the model is evaluated after it,
                the units of every digit seen so far (0..2t+1) are read: a "growing head",
                no task id at test time.
- permuted:     Permuted-MNIST, domain-incremental: every task sees all ten digits with a
                fixed pixel permutation (task 1: the identity), one shared 10-unit head.
- rotated:      Rotated-MNIST, domain-incremental: every task sees all ten digits rotated
                counter-clockwise by a fixed angle, 180°·t/T for task t of T (task 1: 0°), one
                shared 10-unit head. GEM (Lopez-Paz & Ranzato 2017) draws one angle at random
                inside each of these T bins of [0°, 180°); the bins' lower edges keep task 1
                unrotated and the angles independent of the seed.

Every sample carries its task index. `Scenario.columns[s][j]` lists the output units that
task j's samples read once the model has learned tasks 0..s, so losses, evaluation and
importance all select `logits.gather(1, columns[s][task])`; only the growing head of
split-class makes the table change with s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

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
    outputs: int                  # units of the model's output layer
    columns: tuple[Tensor, ...]   # per stage s: (tasks, k_s) units each task reads after tasks 0..s
    tasks: list[Task]

    @property
    def device(self) -> torch.device:
        return self.columns[0].device

    def to(self, device: torch.device) -> "Scenario":
        tasks = [Task(t.name, t.train.to(device), t.eval.to(device)) for t in self.tasks]
        return Scenario(self.name, self.title, self.outputs, tuple(c.to(device) for c in self.columns), tasks)


TITLES = {
    "split-task": "Split-MNIST, task-incremental (multi-head)",
    "split-domain": "Split-MNIST, domain-incremental (shared head)",
    "split-class": "Split-MNIST, class-incremental (growing head)",
    "permuted": "Permuted-MNIST, domain-incremental",
    "rotated": "Rotated-MNIST, domain-incremental",
}
SCENARIOS = tuple(TITLES)


def _task_data(d: Digits, t: int) -> TaskData:
    return TaskData(d.x, d.y, torch.full_like(d.y, t))


def _pair(d: Digits, t: int, relabel: bool = True) -> TaskData:
    """Digits 2t and 2t+1; labelled 0/1 within the pair, or by the digit itself (`relabel=False`)."""
    keep = (d.y == 2 * t) | (d.y == 2 * t + 1)
    return _task_data(Digits(d.x[keep], d.y[keep] - 2 * t if relabel else d.y[keep]), t)


def _fixed(columns: Tensor, num_tasks: int) -> tuple[Tensor, ...]:
    """The same (tasks, k) column table at every stage."""
    return (columns,) * num_tasks


def rotation_angles(num_tasks: int) -> list[float]:
    """Rotated-MNIST's angles in degrees: 180·t/T for t = 0..T-1 (task 1: 0°)."""
    return [180.0 * t / num_tasks for t in range(num_tasks)]


def rotate(x: Tensor, degrees: float) -> Tensor:
    """uint8 images (N, 784) rotated counter-clockwise by `degrees` about the image centre:
    bilinear, zero (black) outside the image, rounded back to uint8."""
    if x.dtype != torch.uint8 or x.dim() != 2 or x.shape[1] != PIXELS:
        raise ValueError(f"expected uint8 images of shape (N, {PIXELS}), got {x.dtype} {tuple(x.shape)}")
    side = int(PIXELS ** 0.5)
    a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    cos, sin = float(a.cos()), float(a.sin())
    # affine_grid maps output to input coordinates (x right, y down): the inverse rotation.
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(x.shape[0], 2, 3)
    images = x.view(-1, 1, side, side).float()
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).view(-1, PIXELS)


def permutations(num_tasks: int, seed: int) -> list[Tensor]:
    """Pixel permutations of Permuted-MNIST: identity first, then random ones drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.arange(PIXELS)] + [torch.randperm(PIXELS, generator=g) for _ in range(num_tasks - 1)]


def make_scenario(name: str, splits: Splits, num_tasks: int, seed: int, evaluate_on: str = "test") -> Scenario:
    """Build scenario `name` with `num_tasks` tasks; `seed` draws Permuted-MNIST's permutations.

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
    if name.startswith("split"):
        relabel = name != "split-class"
        tasks = [Task(f"{2 * t}/{2 * t + 1}", _pair(splits.train, t, relabel), _pair(held, t, relabel))
                 for t in range(num_tasks)]
        if name == "split-task":
            columns, outputs = _fixed(torch.arange(2 * num_tasks).view(num_tasks, 2), num_tasks), 2 * num_tasks
        elif name == "split-domain":
            columns, outputs = _fixed(torch.tensor([[0, 1]]).expand(num_tasks, 2).clone(), num_tasks), 2
        else:  # the growing head: after stage s, every task reads the units of digits 0..2s+1
            columns = tuple(torch.arange(2 * (s + 1)).expand(num_tasks, 2 * (s + 1)).clone()
                            for s in range(num_tasks))
            outputs = 2 * SPLIT_PAIRS  # one unit per digit, whatever the number of tasks
        return Scenario(name, TITLES[name], outputs, columns, tasks)
    if name == "permuted":
        views = [(f"perm {t + 1}", lambda x, p=perm: x[:, p]) for t, perm in enumerate(permutations(num_tasks, seed))]
    else:
        views = [(f"{angle:g}°", lambda x, a=angle: rotate(x, a)) for angle in rotation_angles(num_tasks)]
    tasks = [Task(label, _task_data(Digits(view(splits.train.x), splits.train.y), t),
                  _task_data(Digits(view(held.x), held.y), t)) for t, (label, view) in enumerate(views)]
    return Scenario(name, TITLES[name], 10, _fixed(torch.arange(10).expand(num_tasks, 10).clone(), num_tasks), tasks)
