"""Transactional consolidate/accumulate: a failure anywhere in an importance pass changes nothing.

Exceptions and KeyboardInterrupt are raised from inside the loader, the model's forward,
its backward and the torch.func fallback. Afterwards the MAS state is bit-for-bit what it
was, every module's train/eval flag, every requires_grad flag and every .grad is as
before, no hook is left behind, and retrying gives exactly what an uninterrupted run gives.
"""
from typing import Iterator, Optional

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from mas_fast import MAS
from models import Scale
from state_checks import assert_same_flags, assert_same_state, model_flags, perturb, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:mas_fast.*its parameters use the")


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, exc):
        ctx.exc = exc
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.exc


class _TripScale(Scale):
    """The custom layer, raising `exc` in its n-th call once armed (its per-sample VJP calls it
    inside torch.func)."""

    def forward(self, x):
        self.calls += 1
        if self.calls == self.trip_at:
            raise self.exc
        return super().forward(x)


class Tripwire(nn.Module):
    """A model (BatchNorm, Dropout, a custom layer without a rule, a frozen bias) that raises
    `exc` in its n-th forward, in the backward of it, or in the custom layer's n-th call, once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                                  _TripScale(16), nn.Linear(16, 5))
        self.body[0].bias.requires_grad_(False)
        self.arm(None)

    def arm(self, exc: BaseException, forward_at: Optional[int] = None, backward_at: Optional[int] = None,
            custom_at: Optional[int] = None):
        self.exc, self.forward_at, self.backward_at, self.calls = exc, forward_at, backward_at, 0
        self.body[4].exc, self.body[4].trip_at, self.body[4].calls = exc, custom_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.forward_at:
            raise self.exc
        y = self.body(x)
        return _FailInBackward.apply(y, self.exc) if self.calls == self.backward_at else y


def failing(batches: list, at: int, exc: BaseException) -> Iterator:
    for i, b in enumerate(batches):
        if i == at:
            raise exc
        yield b


def setup(mode: str):
    """A MAS with one consolidated task and one in progress, on a model in mixed modes."""
    torch.manual_seed(0)
    model = Tripwire()
    x = torch.randn(16, 20)
    mas = MAS(model, mode=mode, merge="alpha", alpha=0.3)
    mas.consolidate([(x[:6], torch.zeros(6))], progress=False)
    perturb(model)
    mas.accumulate(x[6:9])
    model.train()
    model.body[1].eval()  # a mixed configuration must come back exactly
    batches = [(x[9:13], torch.zeros(4)), (x[13:], torch.zeros(3)), (x[:2], torch.zeros(2))]
    return mas, model, batches


def twin(mas: MAS, model: nn.Module) -> MAS:
    """An independent MAS in the same state, that never sees the failure."""
    other = MAS(model, mode=mas.mode, merge=mas.merge, alpha=mas.alpha)
    other.load_state_dict(snapshot(mas))
    return other


EXCEPTIONS = [RuntimeError("boom"), KeyboardInterrupt()]
PLACES = [  # (mode, where the failure happens)
    ("per_sample", "loader"), ("per_sample", "forward"), ("per_sample", "backward"),
    ("per_sample", "fallback"), ("batch", "loader"), ("batch", "backward"), ("local", "forward"),
]


def _arm(model: Tripwire, mode: str, where: str, exc: BaseException, batch: int) -> None:
    """Make the `batch`-th importance pass (0-based) fail at `where`."""
    first = batch + 1
    if where == "forward":
        model.arm(exc, forward_at=first)
    elif where == "backward":
        model.arm(exc, backward_at=first)
    elif where == "fallback":  # the custom layer's per-sample VJP, inside torch.func (its 2nd call per batch)
        model.arm(exc, custom_at=2 * batch + 2)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["error", "interrupt"])
@pytest.mark.parametrize("mode,where", PLACES, ids=[f"{m}-{w}" for m, w in PLACES])
def test_failed_consolidate_changes_nothing(mode, where, exc):
    mas, model, batches = setup(mode)
    expected = twin(mas, model)
    before, flags = snapshot(mas), model_flags(model)
    loader = failing(batches, at=1, exc=exc) if where == "loader" else batches
    _arm(model, mode, where, exc, batch=1)
    with pytest.raises(type(exc)):
        mas.consolidate(loader, progress=where == "loader")
    assert_same_state(mas, before)
    assert_same_flags(model, flags)

    model.arm(None)  # the retry equals a run that never failed, bit for bit
    mas.consolidate(batches, progress=False)
    expected.consolidate(batches, progress=False)
    assert_same_state(mas, snapshot(expected))


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["error", "interrupt"])
@pytest.mark.parametrize("where", ["forward", "backward", "fallback"])
def test_failed_accumulate_changes_nothing(where, exc):
    mas, model, batches = setup("per_sample")
    before, flags = snapshot(mas), model_flags(model)
    _arm(model, "per_sample", where, exc, batch=0)
    with pytest.raises(type(exc)):
        mas.accumulate(batches[0][0])
    assert_same_state(mas, before)
    assert_same_flags(model, flags)


class _InterruptingDataset(Dataset):
    def __init__(self, x: torch.Tensor, fail_at: int):
        self.x, self.fail_at = x, fail_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise KeyboardInterrupt  # Ctrl-C while the loader is reading
        return self.x[i], 0


def test_keyboard_interrupt_from_a_dataloader():
    mas, model, _ = setup("per_sample")
    before, flags = snapshot(mas), model_flags(model)
    loader = DataLoader(_InterruptingDataset(torch.randn(10, 20), fail_at=6), batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        mas.consolidate(loader)
    assert_same_state(mas, before)
    assert_same_flags(model, flags)
