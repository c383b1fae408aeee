"""MAS(..., state_dtype=torch.bfloat16): Ω in bfloat16, θ* in the parameter's dtype.

Oracles: the same MAS with float32 state (the default) on the same trained model: the penalty
and its gradient within 1e-2 relative (the lean setting's stated bar: bf16 keeps 8 bits of
mantissa, 2^-9 ≈ 2e-3 relative per element), bytes per parameter from the tensors' sizes.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mas_fast import MAS, ops
from mas_fast.optim import AdamW

LEAN = torch.bfloat16


def trained(dtype=torch.float32):
    """A small MLP, consolidated on one task, then trained a few steps on another (θ ≠ θ*)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).to(dtype)
    x = torch.randn(32, 12, dtype=dtype)
    return model, x


def consolidated(state_dtype, dtype=torch.float32):
    model, x = trained(dtype)
    mas = MAS(model, lambda_=3.0, state_dtype=state_dtype)
    mas.consolidate([x[:16], x[16:]], progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x).float(), torch.ones(32, 5)).backward()
        opt.step()
    return model, mas


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_lean_state_dtypes_and_bytes_per_parameter():
    for dtype, lean_bytes in ((torch.float32, 6), (torch.bfloat16, 4)):
        model, lean = consolidated(LEAN, dtype)
        _, full = consolidated(None, dtype)
        params = sum(p.numel() for p in model.parameters())
        assert all(o.dtype == LEAN for o in lean.importance.values())
        assert all(lean.theta_star[n].dtype == p.dtype for n, p in model.named_parameters())
        assert all(o.dtype == torch.float32 for o in full.importance.values())
        assert lean.memory_bytes()["total"] == lean_bytes * params
        assert full.memory_bytes()["total"] == 8 * params


def test_running_task_stays_float32_with_compensation():
    model, x = trained(torch.bfloat16)
    mas = MAS(model, state_dtype=LEAN)
    mas.accumulate(x)
    assert all(t.dtype == torch.float32 for t in mas.task_importance.values())
    assert all(t.dtype == torch.float32 for t in mas.state_dict()["task_compensation"].values())


def test_penalty_and_gradient_within_one_percent_of_float32_state():
    runs = {"lean": consolidated(LEAN), "full": consolidated(None)}  # the same trained model twice
    values, grads, added, added_grads = {}, {}, {}, {}
    for name, (model, mas) in runs.items():
        model.zero_grad()  # training left gradients
        value = mas.penalty()
        value.backward()
        values[name] = value.detach()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        added[name] = mas.add_penalty_grad_()
        added_grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert values["full"] > 0
    assert relative(values["lean"], values["full"]) <= 1e-2
    assert relative(grads["lean"], grads["full"]) <= 1e-2
    assert relative(added["lean"], values["full"]) <= 1e-2
    assert relative(added_grads["lean"], grads["full"]) <= 1e-2


def test_fused_adamw_step_with_lean_state_tracks_float32_state():
    out = {}
    for name, state_dtype in (("lean", LEAN), ("full", None)):
        model, mas = consolidated(state_dtype)
        opt = AdamW(model.parameters(), lr=0.01, regularizer=mas)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(4, 12)).pow(2).mean().backward()
            opt.step()
        out[name] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt.last_penalty)
    assert relative(out["lean"][0], out["full"][0]) <= 1e-3
    assert relative(out["lean"][1], out["full"][1]) <= 1e-2


def test_auto_runs_lean_state_on_the_reference_and_explicit_kernels_are_refused():
    model, mas = consolidated(LEAN)
    params, theta_star, omega = mas.penalty_terms()
    assert mas.penalty_backend == "reference" and MAS(model).penalty_backend == "auto"
    assert torch.equal(mas.penalty(), ops.reference.penalty(params, theta_star, omega, mas.lambda_))
    assert AdamW(model.parameters(), regularizer=mas).backend == "reference"
    with pytest.raises(ValueError, match="state_dtype"):
        MAS(model, state_dtype=LEAN, backend="cpp")
    with pytest.raises(ValueError, match="state_dtype"):
        MAS(model, state_dtype=torch.float16)


def test_lean_state_dict_round_trip_and_merge():
    model, mas = consolidated(LEAN)
    other = MAS(model, state_dtype=LEAN)
    other.load_state_dict(mas.state_dict())
    for n, o in mas.importance.items():
        assert other.importance[n].dtype == LEAN and torch.equal(other.importance[n], o)
    full = MAS(model)  # a lean state loads into a float32 MAS (upcast) too
    full.load_state_dict(mas.state_dict())
    assert all(o.dtype == torch.float32 for o in full.importance.values())
    before = {n: o.float() for n, o in mas.importance.items()}
    mas.consolidate([torch.randn(8, 12)], progress=False)  # merged in float32, stored in bf16
    assert all(o.dtype == LEAN and bool((o.float() >= before[n]).all()) for n, o in mas.importance.items())
