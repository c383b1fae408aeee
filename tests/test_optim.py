"""mas_fast.optim (SGD / Adam / AdamW with the MAS penalty folded in) against torch.optim
+ the autograd penalty `loss + mas.penalty()`, on every usable backend that implements the
fused steps.

Tolerance: fp32 trajectories over 20 steps agree to rtol 1e-4 / atol 1e-5·max|θ|
(tests/tolerances.py, float32); in practice they differ by a few 1e-8.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mas_fast import MAS, optim
from mas_fast.ops import backend_status
from models import MLP
from tolerances import assert_close

BACKENDS = [b for b in ("reference", "cpp") if backend_status()[b] is None]
STEPS = 20
LAM = 2.0

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)),
]


class TwoHeads(nn.Module):
    """An MLP body with an old head (covered by MAS, unused by the new task's loss) and a new
    head added after consolidation (not covered)."""

    def __init__(self):
        super().__init__()
        self.body = MLP(d_out=8)
        self.old_head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.new_head(h) if hasattr(self, "new_head") else self.old_head(h)


def consolidated(seed: int = 0):
    """(model, mas state_dict, data): θ* and Ω from task 1, then a new head for task 2."""
    torch.manual_seed(seed)
    model = TwoHeads()
    mas = MAS(model, lambda_=LAM)
    mas.consolidate([torch.randn(16, 20)], progress=False)
    model.new_head = nn.Linear(8, 4)
    with torch.no_grad():  # move away from θ* so the penalty matters from the first step
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = [(torch.randn(8, 20), torch.randint(0, 4, (8,))) for _ in range(STEPS)]
    return model, mas.state_dict(), data


def train(model, mas_state, data, make_opt, fused: bool, backend: str = "auto", check_penalty: bool = True):
    model = copy.deepcopy(model)
    mas = MAS(model, lambda_=LAM, backend=backend)
    mas.load_state_dict(mas_state)
    opt = make_opt(model.parameters(), mas)
    penalties = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        if not fused:
            loss = loss + mas.penalty()
        penalties.append(mas.penalty().detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if fused and check_penalty:
            assert_close(opt.last_penalty, penalties[-1], torch.float32, "last_penalty")
    return model, opt


def torch_opt(name, kw):
    return lambda params, mas: getattr(torch.optim, name)(params, foreach=True, **kw)


def fused_opt(name, kw, backend=None):
    return lambda params, mas: getattr(optim, name)(params, regularizer=mas, backend=backend, **kw)


def assert_same_params(a: nn.Module, b: nn.Module, msg: str) -> None:
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert_close(x, y, torch.float32, f"{msg}: {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", CONFIGS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_trajectory_matches_torch_optim_plus_autograd_penalty(backend, name, kw):
    model, mas_state, data = consolidated()
    want, _ = train(model, mas_state, data, torch_opt(name, kw), fused=False)
    got, opt = train(model, mas_state, data, fused_opt(name, kw, backend), fused=True, backend=backend)
    assert_same_params(got, want, f"{name} {kw} on {backend}")
    moved = [not torch.equal(p, q) for p, q in zip(got.old_head.parameters(), model.old_head.parameters())]
    assert all(moved), "the unused, covered old head must take penalty-gradient steps"


def test_without_regularizer_or_consolidation_is_plain_torch_optim():
    torch.manual_seed(0)
    model = MLP()
    data = [(torch.randn(8, 20), torch.randint(0, 5, (8,))) for _ in range(5)]
    for make in (lambda ps: optim.AdamW(ps, lr=1e-2), lambda ps: optim.AdamW(ps, lr=1e-2, regularizer=MAS(model))):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        opts = (torch.optim.AdamW(a.parameters(), lr=1e-2), make(b.parameters()))
        for x, y in data:
            for m, opt in zip((a, b), opts):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
        assert_same_params(b, a, "plain AdamW")
        assert opts[1].last_penalty.item() == 0.0


def test_frozen_covered_parameter_is_not_stepped():
    model, mas_state, data = consolidated()
    model.old_head.requires_grad_(False)
    before = [p.clone() for p in model.old_head.parameters()]
    got, opt = train(model, mas_state, data[:3], fused_opt("SGD", dict(lr=0.1, momentum=0.9)), fused=True,
                     check_penalty=False)  # last_penalty leaves out the frozen head
    assert all(torch.equal(p, q) for p, q in zip(got.old_head.parameters(), before))
    assert not any(p in opt.state for p in got.old_head.parameters())


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("AdamW", dict(lr=1e-2, amsgrad=True))])
def test_state_dict_round_trips_with_torch_optim(name, kw):
    """torch.optim's state_dict continues in mas_fast.optim and vice versa, same trajectory."""
    model, mas_state, data = consolidated()
    first, rest = data[:5], data[5:10]
    ref_model, ref_opt = train(model, mas_state, first, torch_opt(name, kw), fused=False)

    def continue_from(state_dict, make, fused):
        m = copy.deepcopy(ref_model)
        mas = MAS(m, lambda_=LAM)
        mas.load_state_dict(mas_state)
        opt = make(m.parameters(), mas)
        opt.load_state_dict(copy.deepcopy(state_dict))
        for x, y in rest:
            loss = F.cross_entropy(m(x), y) + (0 if fused else mas.penalty())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m, opt

    want, torch_after = continue_from(ref_opt.state_dict(), torch_opt(name, kw), fused=False)
    got, ours_after = continue_from(ref_opt.state_dict(), fused_opt(name, kw), fused=True)
    assert_same_params(got, want, "torch.optim state_dict loaded into mas_fast.optim")
    ours_state, torch_state = ours_after.state_dict()["state"], torch_after.state_dict()["state"]
    assert {k: sorted(v) for k, v in ours_state.items()} == {k: sorted(v) for k, v in torch_state.items()}
    back, _ = continue_from(ours_after.state_dict(), torch_opt(name, kw), fused=False)
    again, _ = continue_from(torch_after.state_dict(), torch_opt(name, kw), fused=False)
    assert_same_params(back, again, "mas_fast.optim state_dict loaded into torch.optim")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mas_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_the_reference_twin(dtype):
    model, mas_state, data = consolidated()
    model = model.to(dtype)
    data = [(x.to(dtype), y) for x, y in data[:5]]
    want, _ = train(model, mas_state, data, fused_opt("AdamW", dict(lr=1e-2), "reference"), fused=True,
                    backend="reference")
    got, _ = train(model, mas_state, data, fused_opt("AdamW", dict(lr=1e-2), "cpp"), fused=True, backend="cpp")
    for x, y in zip(got.parameters(), want.parameters()):
        assert x.dtype == dtype
        assert_close(x, y, dtype, "low-precision fused AdamW")


def test_closure_is_evaluated_with_grad():
    model, mas_state, data = consolidated()
    mas = MAS(model, lambda_=LAM)
    mas.load_state_dict(mas_state)
    opt = optim.SGD(model.parameters(), lr=0.1, regularizer=mas)
    x, y = data[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure)) and opt.last_penalty.item() > 0


@pytest.mark.parametrize("make,exc,match", [
    (lambda ps: optim.SGD(ps, lr=-1.0), ValueError, "lr must be >= 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), ValueError, "nesterov"),
    (lambda ps: optim.Adam(ps, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in"),
    (lambda ps: optim.Adam(ps, betas=0.9), ValueError, "betas must be a pair"),
    (lambda ps: optim.AdamW(ps, eps="1e-8"), TypeError, "eps must be a number"),
    (lambda ps: optim.AdamW(ps, regularizer="mas"), TypeError,
     "PenaltyRegularizer.*str lacks: penalty_terms, penalty_strength, penalty_backend"),
    (lambda ps: optim.AdamW(ps, backend="gpu"), ValueError, "backend must be"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make(MLP().parameters())
