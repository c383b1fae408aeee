"""One continual-learning run: a fresh MLP learns the tasks of a scenario in order.

After each task the method consolidates (importance pass) and the model is evaluated on
every task's held-out digits, filling row t of the accuracy matrix R. Time is split into
training (the optimisation loop, penalty included), the importance passes, and the penalty
alone (`add_penalty_grad_`). The optimizer is fresh for every task, so Adam's moments of
one task never move the parameters (e.g. old heads) during the next.

A MAS method takes the penalty by either `penalty_step` of mas_fast.optim: "gradient"
(torch.optim.Adam on the loss gradient plus `add_penalty_grad_`, i.e. on `loss + mas.penalty()`)
or "proximal" (mas_fast.optim.Adam with the penalty's proximal map folded into the step; its
cost is then part of the training time and penalty_s stays 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.optim_config import PENALTY_STEPS, check_penalty_step
from ..optim import Adam as FusedAdam
from .config import Config
from .methods import MASMethod, Method, make_method
from .scenarios import PIXELS, Scenario, TaskData

Tensor = torch.Tensor
EVAL_BATCH = 1024


class Stopwatch:
    """Accumulates the seconds spent inside `with watch:` blocks (CUDA-synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start


@dataclass
class RunResult:
    scenario: str
    method: str
    seed: int
    lambda_: float
    R: list[list[float]]
    train_s: float
    importance_s: float
    penalty_s: float
    importance: dict[str, Tensor] = field(default_factory=dict, repr=False)  # final Ω / Fisher, on CPU
    metric: str = "accuracy"  # what R holds: "accuracy" (higher is better) or "loss" (text, nats/byte)
    penalty_step: str = "gradient"  # how the penalty entered the step (mas_fast.optim's names)


def mlp(hidden: Sequence[int], outputs: int) -> nn.Sequential:
    """784 → hidden… (ReLU) → outputs."""
    layers: list[nn.Module] = []
    width = PIXELS
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, outputs))


@torch.no_grad()
def accuracy(model: nn.Module, data: TaskData, columns: Tensor) -> float:
    """Fraction of `data` classified correctly: the argmax over the units `columns[task]` of
    each sample's task (one stage's table of `Scenario.columns`)."""
    was_training = model.training
    model.eval()
    correct = 0
    for idx in torch.arange(len(data), device=data.y.device).split(EVAL_BATCH):
        logits = model(data.inputs(idx)).gather(1, columns[data.task[idx]])
        correct += int((logits.argmax(1) == data.y[idx]).sum())
    model.train(was_training)
    return correct / max(1, len(data))


def penalty_steps(method_name: str) -> tuple[str, ...]:
    """The penalty steps `method_name` trains with: "gradient" and "proximal" for MAS (the demo
    compares the two steps for MAS); "gradient" only otherwise (SI's path integral is recorded
    around the explicit step's `add_penalty_grad_`)."""
    return PENALTY_STEPS if method_name.startswith("mas_") else PENALTY_STEPS[:1]


def check_penalty_step_for(method_name: str, penalty_step: str) -> None:
    """ValueError unless `penalty_step` is one of `penalty_steps(method_name)`."""
    check_penalty_step(penalty_step)
    if penalty_step not in penalty_steps(method_name):
        raise ValueError(f"penalty_step 'proximal' needs a MAS method in the demo, got method {method_name!r}")


def make_optimizer(model: nn.Module, method: Method, lr: float, penalty_step: str) -> torch.optim.Optimizer:
    """Adam for one task: torch.optim's ("gradient": the loop adds the penalty gradient) or
    mas_fast.optim's with the MAS penalty's proximal map in the step ("proximal")."""
    if penalty_step == "proximal" and isinstance(method, MASMethod):
        return FusedAdam(model.parameters(), lr=lr, regularizer=method.mas, penalty_step="proximal")
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_task(model: nn.Module, data: TaskData, columns: Tensor, method: Method, config: Config,
               generator: torch.Generator, penalty_clock: Stopwatch, penalty_step: str = "gradient") -> None:
    """`config.epochs` passes over `data` in shuffled mini-batches: loss, backward, penalty, step.

    `columns` is the current stage's table: the loss reads each sample's task units."""
    model.train()
    opt = make_optimizer(model, method, config.lr, penalty_step)
    add_penalty = method.penalised and getattr(opt, "regularizer", None) is None  # else the step holds it
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).to(data.y.device)
        for idx in order.split(config.batch_size):
            logits = model(data.inputs(idx)).gather(1, columns[data.task[idx]])
            loss = F.cross_entropy(logits, data.y[idx])
            opt.zero_grad()
            loss.backward()
            if add_penalty:
                with penalty_clock:
                    method.add_penalty_grad_()
            opt.step()
            method.after_step()


def run(scenario: Scenario, method_name: str, config: Config, seed: int, lambda_: float = 0.0,
        backend: str = "auto", on_task: Optional[Callable[[], None]] = None,
        penalty_step: str = "gradient") -> RunResult:
    """Learn `scenario`'s tasks in order with `method_name`; the scenario's tensors set the device.

    The seed fixes the initial weights and the mini-batch order, so every method of a seed
    starts from the same network and sees the same batches. `penalty_step` ("gradient" or
    "proximal", the latter for MAS methods only) says how the penalty enters Adam's step.
    """
    check_penalty_step_for(method_name, penalty_step)
    device = scenario.device
    torch.manual_seed(seed)
    model = mlp(config.hidden, scenario.outputs).to(device)
    method = make_method(method_name, model, lambda_, backend)
    generator = torch.Generator().manual_seed(seed)
    train_clock, importance_clock, penalty_clock = Stopwatch(device), Stopwatch(device), Stopwatch(device)
    tasks = scenario.tasks
    R = [[0.0] * len(tasks) for _ in tasks]
    for t, task in enumerate(tasks):
        data = TaskData.concat([u.train for u in tasks[:t + 1]]) if method.joint else task.train
        with train_clock:
            train_task(model, data, scenario.columns[t], method, config, generator, penalty_clock, penalty_step)
        with importance_clock:
            method.end_task(task.train.inputs(), task.train.y, scenario.columns[t][t])
        R[t] = [accuracy(model, u.eval, scenario.columns[t]) for u in tasks]
        if on_task is not None:
            on_task()
    importance = {n: v.detach().cpu() for n, v in method.importance.items()}
    return RunResult(scenario.name, method_name, seed, float(lambda_), R, train_clock.seconds,
                     importance_clock.seconds, penalty_clock.seconds, importance, penalty_step=penalty_step)
