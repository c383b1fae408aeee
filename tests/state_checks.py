"""Helpers for tests that a failed call leaves the MAS state exactly as it was."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from mas_fast import MAS
from models import MLP


def snapshot(mas: MAS) -> dict[str, Any]:
    """A deep copy of everything MAS keeps: Ω, θ*, the running task Ω/compensation/count, config."""
    return copy.deepcopy(mas.state_dict())


def assert_same_state(mas: MAS, before: dict[str, Any]) -> None:
    """Bit-for-bit equality of the state with a snapshot (tensors: same dtype, device, values)."""
    after = mas.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert after[key].keys() == value.keys(), key
            for name, t in value.items():
                got = after[key][name]
                assert got.dtype == t.dtype and got.device == t.device, f"{key}[{name}]"
                assert torch.equal(got, t), f"{key}[{name}] changed"
        else:
            assert after[key] == value, key


@contextmanager
def unchanged(mas: MAS) -> Iterator[None]:
    """Asserts that the block leaves the MAS state exactly as it found it."""
    before = snapshot(mas)
    yield
    assert_same_state(mas, before)


def model_flags(model: nn.Module) -> tuple[list[bool], list[bool], list[Any]]:
    """Each module's train/eval flag, each parameter's requires_grad and .grad, in order."""
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def assert_same_flags(model: nn.Module, before: tuple) -> None:
    modes, requires, grads = model_flags(model)
    assert modes == before[0], "train/eval modes not restored"
    assert requires == before[1], "requires_grad flags changed"
    assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(grads, before[2])), ".grad changed"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {type(m).__name__}"


def perturb(model: nn.Module, scale: float = 0.1, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def trained(task_in_progress: bool = True, **kwargs: Any) -> tuple[MAS, MLP, torch.Tensor]:
    """An fp32 MLP whose MAS has one consolidated task (Ω, θ*) and, optionally, a second in
    progress (running Ω, compensation, count): every piece of state is non-trivial."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(12, 20)
    mas = MAS(model, **kwargs)
    mas.consolidate([x[:5], x[5:8]], progress=False)
    perturb(model)
    if task_in_progress:
        mas.accumulate(x[8:])
    return mas, model, x
