"""Mixed precision on CPU: bf16/fp16 models and torch.autocast(bf16) during importance passes and
training. Ω and θ* stay float32.

Accuracy (as flash-attention's tests): the per-sample Ω of a low-precision run is compared
with the float64 truth, and its error must be at most twice that of PyTorch's own per-sample
computation in the same precision (autograd on one sample at a time) — the forward in
bf16 already costs a few percent on these models, whatever computes Ω afterwards.
"""
import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from mas_fast import MAS
from models import make_case
from tolerances import assert_close

LOW = {  # name → (model dtype, autocast dtype or None)
    "autocast_bf16": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}


def precision(model, x, name):
    """A copy of (model, x) in the named precision, and the context to run it in."""
    dtype, autocast = LOW[name]
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    return model, x, torch.autocast("cpu", dtype=autocast) if autocast else nullcontext()


def per_sample_loop(model, x):
    """Σ_k |∂‖F(x_k)‖²/∂θ| with plain autograd, one sample at a time, summed in float32+."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
           for n, p in params.items()}
    model.eval()
    for k in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[k:k + 1]).float().pow(2).sum(), list(params.values()),
                                    allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                out[n] += g.to(out[n].dtype).abs()
    return out


def rel_error(actual, truth):
    """Largest per-tensor error relative to the tensor's largest truth value."""
    return max(((actual[n].double() - t).abs().max() / t.abs().max()).item()
               for n, t in truth.items() if t.abs().max() > 0)


@pytest.mark.parametrize("name", list(LOW))
@pytest.mark.parametrize("case", ["mlp", "cnn", "seq", "shared"])
def test_per_sample_importance_is_fp32_and_as_accurate_as_pytorch(case, name):
    model64, x64 = make_case(case, batch=6)
    truth = per_sample_loop(model64, x64)
    model, x, ctx = precision(model64, x64, name)
    with ctx:
        baseline = per_sample_loop(copy.deepcopy(model), x)
        mas = MAS(model)
        mas.accumulate(x)
    omega = {n: v * 6 for n, v in mas.task_importance.items()}
    assert all(v.dtype == torch.float32 for v in omega.values())
    ours, theirs = rel_error(omega, truth), rel_error(baseline, truth)
    assert ours <= 2 * theirs + 1e-3, f"{case}/{name}: error {ours:.4f} vs PyTorch's {theirs:.4f}"


@pytest.mark.parametrize("mode", ["batch", "local"])
@pytest.mark.parametrize("name", ["autocast_bf16", "bf16"])
def test_batch_and_local_modes_stay_fp32(mode, name):
    model64, x64 = make_case("cnn", batch=6)
    full = MAS(model64.float(), mode=mode)
    full.accumulate(x64.float())
    model, x, ctx = precision(model64, x64, name)
    with ctx:
        mas = MAS(model, mode=mode)
        mas.accumulate(x)
    for n, v in mas.task_importance.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), n
        if mode == "local":  # each layer's own output: no deep bf16 error chain
            assert_close(v, full.task_importance[n], torch.bfloat16, n)
    if mode == "local":  # verification allows bf16 round-off: no layer demoted from its rule
        assert set(mas.coverage().values()) == {"rule"}, mas.coverage()


def test_bf16_model_theta_star_is_the_exact_fp32_upcast_and_penalty_is_fp32():
    model, x = make_case("mlp", dtype=torch.bfloat16)
    mas = MAS(model, lambda_=1.5)
    mas.consolidate([x], progress=False)
    named = dict(model.named_parameters())
    for n, t in mas.theta_star.items():
        assert t.dtype == torch.float32 and torch.equal(t, named[n].detach().float())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.125)
    penalty = mas.penalty()
    assert penalty.dtype == torch.float32
    want = 1.5 * sum((mas.importance[n].double() * (named[n].double() - mas.theta_star[n].double()) ** 2).sum()
                     for n in mas.importance)
    assert_close(penalty.double(), want, torch.float32, "penalty")
    penalty.backward()
    for n, p in named.items():
        assert p.grad.dtype == torch.bfloat16
        assert_close(p.grad, 3.0 * mas.importance[n] * (p.detach().float() - mas.theta_star[n]),
                     torch.bfloat16, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves the penalty alone
        assert torch.equal(mas.penalty(), penalty.detach())


def test_autocast_training_step_gets_exactly_the_penalty_gradient():
    model, x = make_case("cnn", dtype=torch.float32)
    y = torch.arange(x.shape[0]) % 4
    mas = MAS(model, lambda_=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mas.consolidate([x], progress=False)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))

    def grads(with_penalty, fold=False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
            if with_penalty and not fold:
                loss = loss + mas.penalty()
        loss.backward()
        if fold:
            mas.add_penalty_grad_()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, added, folded = grads(False), grads(True), grads(True, fold=True)
    named = dict(model.named_parameters())
    for n, o in mas.importance.items():
        want = 4.0 * o * (named[n].detach() - mas.theta_star[n])
        assert_close(added[n] - plain[n], want, torch.float32, n)
        assert_close(folded[n], added[n], torch.float32, n)


def test_passes_in_any_precision_leave_the_models_parameters_in_place():
    """A module reachable under two names (`self.alias = self.twice`) goes through the torch.func
    fallback; every pass must leave the model's own Parameter objects in place."""
    model, x = make_case("shared", dtype=torch.float32)
    before = {n: p for n, p in model.named_parameters()}
    first = MAS(model)
    first.accumulate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MAS(model).accumulate(x)
    again = MAS(model)
    again.accumulate(x)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is p and isinstance(p, torch.nn.Parameter) for n, p in before.items())
    for n, v in first.task_importance.items():
        assert torch.equal(again.task_importance[n], v), n
