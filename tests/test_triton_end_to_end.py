"""MAS(model, backend="triton") equals MAS(model, backend="reference") on the shared test models.

float32 models (the Triton kernels refuse float64); CPU tensors in Triton's interpreter
without a GPU, CUDA tensors with one. Each test also checks that the Triton kernels
really ran (a silent fallback to the reference would pass the comparison).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from mas_fast import MAS, ops
from models import make_case
from tolerances import assert_close

_REASON = ops.backend_status()["triton"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


@pytest.fixture
def triton_calls(monkeypatch) -> Counter:
    """Counts the calls that reach each op of the triton backend."""
    from mas_fast.ops import triton as tb

    calls: Counter = Counter()
    for name in tb.OPS:
        def counted(*args, _fn=getattr(tb, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(tb, name, counted)
    return calls


def consolidated(model, batches, backend: str, **kwargs) -> MAS:
    mas = MAS(model, backend=backend, **kwargs)
    for xb in batches:
        mas.accumulate(xb)
    mas.consolidate(progress=False)
    return mas


def assert_same_importance(got: MAS, want: MAS) -> None:
    assert set(got.importance) == set(want.importance)
    for name, value in want.importance.items():
        assert got.importance[name].dtype == F32
        assert_close(got.importance[name], value, F32, name)


@pytest.mark.parametrize("name,mode,kernels", [
    ("mlp", "per_sample", {"abs_matmul", "per_sample_abs_sum", "running_mean_update_"}),
    ("mlp", "local", {"abs_matmul", "per_sample_abs_sum"}),
    ("cnn", "per_sample", {"conv_abs_grad", "per_sample_abs_sum"}),
    ("seq", "per_sample", {"per_sample_abs_matmul", "per_sample_abs_sum"}),
])
def test_importance_matches_reference(name, mode, kernels, triton_calls):
    model, x = make_case(name, F32, batch=5)
    model, x = model.to(DEVICE), x.to(DEVICE)
    batches = [x[:3], x[3:]]  # streaming, batches of different sizes
    got = consolidated(model, batches, "triton", mode=mode)
    assert kernels <= set(triton_calls), f"triton kernels used: {dict(triton_calls)}"
    assert_same_importance(got, consolidated(model, batches, "reference", mode=mode))


def _two_tasks(model, x, backend: str) -> MAS:
    """Two consolidations (alpha merge) with a parameter change in between."""
    mas = consolidated(model, [x], backend, merge="alpha", alpha=0.3, lambda_=0.8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mas.accumulate(x)
    mas.consolidate(progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mas


def test_merge_penalty_and_penalty_grad_match_reference(triton_calls):
    model, x = make_case("mlp", F32, batch=4)
    model, x = model.to(DEVICE), x.to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        m = make_case("mlp", F32)[0].to(DEVICE)
        m.load_state_dict(model.state_dict())
        mas = _two_tasks(m, x, backend)
        value = mas.penalty()
        value.backward()
        autograd = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=False)
        fused = mas.add_penalty_grad_()
        results[backend] = (mas, value.detach(), autograd, fused, {n: p.grad for n, p in m.named_parameters()})
    assert {"merge_", "penalty", "penalty_and_grad_"} <= set(triton_calls)
    (mas_t, v_t, ag_t, f_t, g_t), (mas_r, v_r, ag_r, f_r, g_r) = results["triton"], results["reference"]
    assert_same_importance(mas_t, mas_r)
    assert_close(v_t.cpu(), v_r.cpu(), F32, "penalty")
    assert_close(f_t.cpu(), f_r.cpu(), F32, "add_penalty_grad_ value")
    for n in ag_r:
        assert_close(ag_t[n], ag_r[n], F32, f"penalty autograd {n}")
        assert_close(g_t[n], g_r[n], F32, f"add_penalty_grad_ {n}")


def test_penalty_compiles_without_graph_breaks():
    """The custom ops trace (fake kernels + autograd formula) under torch.compile(fullgraph=True)."""
    model, x = make_case("mlp", F32, batch=4)
    model, x = model.to(DEVICE), x.to(DEVICE)
    mas = _two_tasks(model, x, "triton")

    def step():
        return (model(x) ** 2).mean() + mas.penalty()

    eager = step()
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)()
    compiled.backward()
    assert_close(compiled.detach().cpu(), eager.detach().cpu(), F32, "compiled loss")
    for n, p in model.named_parameters():
        assert_close(p.grad, want[n], F32, f"compiled grad {n}")
