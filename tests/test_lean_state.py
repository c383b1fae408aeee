"""MAS(..., state_dtype=torch.bfloat16): Ω in bfloat16, θ* in the parameter's dtype, read as it is
by every backend's penalty and fused steps.

Oracles: the same MAS with float32 state (the default) on the same trained model: the penalty
and its gradient within 1e-2 relative (the lean setting's stated bar: bf16 keeps 8 bits of
mantissa, 2^-9 ≈ 2e-3 relative per element); the reference backend on the same lean state (the
kernels add only float32 round-off); bytes per parameter from the tensors' sizes; the
allocations of the cpp kernels from torch's profiler (no float32 copy of Ω or θ*).
"""
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends import usable_backends
from mas_fast import MAS, ops
from mas_fast.optim import SGD, AdamW
from memory_tracking import AllocationRecorder

LEAN = torch.bfloat16
# The backends that run CPU models here (the cuda backend's lean state: tests/test_cuda_*.py).
CPU_BACKENDS = [b for b in usable_backends() if b != "cuda"]
KERNEL_OPS = ("penalty", "penalty_and_grad_", "sgd_step_", "adam_step_")


def trained(dtype=torch.float32):
    """A small MLP, consolidated on one task, then trained a few steps on another (θ ≠ θ*)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).to(dtype)
    x = torch.randn(32, 12, dtype=dtype)
    return model, x


def consolidated(state_dtype, dtype=torch.float32, backend="auto"):
    model, x = trained(dtype)
    mas = MAS(model, lambda_=3.0, state_dtype=state_dtype, backend=backend)
    mas.consolidate([x[:16], x[16:]], progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x).float(), torch.ones(32, 5)).backward()
        opt.step()
    return model, mas


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """Counts the penalty and step calls that reach each backend module (a silent fallback to
    the reference would otherwise pass the comparisons)."""
    calls: Counter = Counter()
    for backend in CPU_BACKENDS:
        module = ops._load(backend)[0]
        for name in KERNEL_OPS:
            def counted(*args, _fn=getattr(module, name), _key=(backend, name), **kwargs):
                calls[_key] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


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


def penalty_and_gradients(model, mas):
    """(penalty, its autograd gradient, add_penalty_grad_'s value, its gradient)."""
    model.zero_grad()  # training left gradients
    value = mas.penalty()
    value.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    added = mas.add_penalty_grad_()
    return value.detach(), grads, added, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_penalty_and_gradient_within_one_percent_of_float32_state(backend, dtype, kernel_calls):
    lean = penalty_and_gradients(*consolidated(LEAN, dtype, backend))
    full = penalty_and_gradients(*consolidated(None, dtype, "reference"))  # the same trained model
    assert full[0] > 0
    assert lean[0].dtype == torch.float32  # the value is float32 for a bf16 Ω too
    for got, want in zip(lean, full):
        assert relative(got, want) <= 1e-2
    if backend != "reference":
        assert kernel_calls[(backend, "penalty")] and kernel_calls[(backend, "penalty_and_grad_")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernels_on_lean_state_match_the_reference_on_it(backend):
    """Same lean state, kernel vs reference: only float32 round-off apart (not the 1e-2 of bf16)."""
    model, mas = consolidated(LEAN, torch.bfloat16)
    params, theta_star, omega = mas.penalty_terms()
    want = ops.penalty(params, theta_star, omega, mas.lambda_, backend="reference")
    got = ops.penalty(params, theta_star, omega, mas.lambda_, backend=backend)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("penalty_step", ["gradient", "proximal"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_steps_with_lean_state_track_float32_state(backend, penalty_step, kernel_calls):
    for make, op in ((lambda ps, m: AdamW(ps, lr=0.01, regularizer=m, penalty_step=penalty_step), "adam_step_"),
                     (lambda ps, m: SGD(ps, lr=0.05, momentum=0.9, regularizer=m, penalty_step=penalty_step),
                      "sgd_step_")):
        out = {}
        for name, state_dtype, run_on in (("lean", LEAN, backend), ("full", None, "reference")):
            model, mas = consolidated(state_dtype, backend=run_on)
            opt = make(model.parameters(), mas)
            assert opt.backend == run_on
            for _ in range(3):
                opt.zero_grad()
                model(torch.ones(4, 12)).pow(2).mean().backward()
                opt.step()
            out[name] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt.last_penalty)
        assert relative(out["lean"][0], out["full"][0]) <= 1e-3
        assert relative(out["lean"][1], out["full"][1]) <= 1e-2
        if backend != "reference":
            assert kernel_calls[(backend, op)] == 3


def test_penalty_backend_is_the_mas_backend_for_either_state():
    model, _ = trained()
    for backend in CPU_BACKENDS:
        lean = MAS(model, state_dtype=LEAN, backend=backend)
        assert lean.penalty_backend == backend == MAS(model, backend=backend).penalty_backend
    assert MAS(model, state_dtype=LEAN).penalty_backend == "auto"
    with pytest.raises(ValueError, match="state_dtype"):
        MAS(model, state_dtype=torch.float16)


def allocated_bytes(prof) -> int:
    """Bytes the CPU allocator handed out under the profiler: each event's own allocations
    (an op's total repeats its children's; a free shows as a negative self usage elsewhere)."""
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cpp_kernels_make_no_float32_copy_of_the_lean_state(op):
    """Every byte the C++ allocator hands out during one op, from torch's profiler (it sees the
    kernels' own allocations, below the Python dispatcher): far below one float32 copy of Ω."""
    n = 1 << 20
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).to(LEAN)]
    grads = [torch.randn(n, generator=g).to(LEAN)]
    theta_star = [(params[0].float() + 0.01).to(LEAN)]
    omega = [torch.rand(n, generator=g).to(LEAN)]
    exp_avgs, exp_avg_sqs = [torch.zeros(n, dtype=LEAN)], [torch.zeros(n, dtype=LEAN)]
    calls = {
        "penalty": lambda: ops.penalty(params, theta_star, omega, 1.0, backend="cpp"),
        "penalty_and_grad_": lambda: ops.penalty_and_grad_(params, grads, theta_star, omega, 1.0, backend="cpp"),
        "sgd_step_": lambda: ops.sgd_step_(params, grads, [], theta_star, omega, 1.0, ops.SGDConfig(lr=0.1),
                                           backend="cpp"),
        "adam_step_": lambda: ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, [], [torch.zeros(())],
                                             theta_star, omega, 1.0, ops.AdamConfig(lr=0.1), backend="cpp"),
    }
    calls[op]()  # warm-up: first-call allocations (thread pools, caches) do not count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof, \
            AllocationRecorder() as recorded:
        calls[op]()
    assert allocated_bytes(prof) < n  # a float32 copy of Ω alone: 4·n bytes
    assert recorded.peak_bytes < n
    # the probe sees the kernels' own copies: a strided Ω gets a contiguous (bf16) one in C++
    strided = [torch.stack([omega[0], omega[0]], 1)[:, 0]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.penalty(params, theta_star, strided, 1.0, backend="cpp")
    assert allocated_bytes(prof) >= 2 * n


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
