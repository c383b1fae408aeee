"""torch.compile(fullgraph=True): a loss that calls mas.penalty(), and the fused optimizer step.

The penalty runs as the custom op mas_fast::penalty (cpp backend; fake impl + autograd formula
in mas_fast/ops/cpp_registrations.py) or as plain PyTorch (reference); both must trace without graph
breaks, also when no backend has been loaded before tracing starts.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mas_fast import MAS, ops, optim
from models import MLP
from tolerances import assert_close

BACKENDS = [b for b in ("reference", "cpp") if ops.backend_status()[b] is None]
# Dynamo (fullgraph) + AOTAutograd with fake tensors and functionalization, i.e. everything
# torch.compile does with the custom ops except Inductor's C++ code generation, which would
# cost ~20 s per graph on a CI CPU without testing anything of mas_fast.
COMPILER = "aot_eager"


def setup_task(backend: str):
    torch.manual_seed(0)
    model = MLP()
    mas = MAS(model, lambda_=0.5, backend=backend)
    mas.consolidate([torch.randn(8, 20)], progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = [(torch.randn(4, 20), torch.randint(0, 5, (4,))) for _ in range(3)]
    return model, mas, data


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_with_penalty_compiles_fullgraph(backend, monkeypatch):
    torch._dynamo.reset()
    model, mas, data = setup_task(backend)
    monkeypatch.setattr(ops, "_LOADED", {})  # cold: tracing must not have to import a backend

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y) + mas.penalty()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=COMPILER)
    params = list(model.parameters())
    for x, y in data:
        want = loss_fn(x, y)
        want_grads = torch.autograd.grad(want, params)
        got = compiled(x, y)
        got_grads = torch.autograd.grad(got, params)
        assert_close(got, want, torch.float32, "loss")
        for a, b in zip(got_grads, want_grads):
            assert_close(a, b, torch.float32, "grad")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mas_fast._C not built")
def test_fused_optimizer_step_compiles_fullgraph():
    torch._dynamo.reset()
    model, mas, data = setup_task("cpp")
    twin = copy.deepcopy(model)
    twin_mas = MAS(twin, lambda_=0.5)
    twin_mas.load_state_dict(mas.state_dict())
    eager = optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True, regularizer=mas)
    traced = optim.AdamW(twin.parameters(), lr=1e-2, amsgrad=True, regularizer=twin_mas)
    compiled_step = torch.compile(traced.step, fullgraph=True, backend=COMPILER)
    for x, y in data:
        for m, opt, step in ((model, eager, eager.step), (twin, traced, compiled_step)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            step()
        assert_close(traced.last_penalty, eager.last_penalty, torch.float32, "last_penalty")
    for a, b in zip(twin.parameters(), model.parameters()):
        assert_close(a, b, torch.float32, "params")
    assert traced.state_dict()["state"][0]["step"].item() == len(data)
