"""GPU: the MAS penalty and the fused optimizer step at 100M fp32 parameters, with their bars.

Parameters are a stack of 4096×4096 layers with biases (16,781,312 each; 6 layers ≈ 100.7M),
fp32, θ* = θ + noise, Ω ≥ 0, gradients present. Groups (one baseline each, same run):
- penalty: autograd `lam*(omega*(p-p_old)**2).sum()` + backward (Avalanche's form; baseline),
  `penalty_and_grad_` on the "cuda" and "triton" backends, and `copy_` of the same 20 bytes
  per parameter (the bandwidth roof).
- adamw: torch.optim.AdamW(fused=True) without penalty (baseline), the same plus the
  autograd penalty, and mas_fast.optim.AdamW with the penalty folded in ("cuda", "triton"
  where it implements the step), explicit and with penalty_step="proximal".
- sgd: mas_fast.optim.SGD (momentum 0.9) on "cuda" (baseline: explicit) and "triton",
  explicit and proximal.
`test_bars` checks: penalty_and_grad_ ≥ 0.85 of copy_'s bandwidth and ≥ 8× faster than the
autograd form; fused AdamW+MAS ≤ 1.1× fused AdamW without penalty; the proximal step ≤ 1.05×
the explicit one (AdamW and SGD, per backend). Rows that stream a known
number of bytes carry gb_per_s. Byte count matters for the AdamW bar: torch's fused step
moves 28 bytes per fp32 parameter (reads θ, g, m, v; writes θ, m, v), the step with MAS 36
(θ* and Ω too), so at equal bandwidth the fused step takes 36/28 ≈ 1.29× as long: a ratio
above 1.1 with gb_per_s at or above torch's means the kernel is at the memory limit.
"""
from __future__ import annotations

import pytest
import torch

from common import measure, record, timings
from mas_fast import MAS, ops, optim
from mas_fast.ops import backend_status

SUITE = "cuda"
DEVICE = "cuda"
LAYER = (4096, 4096)
LAYERS = 6
LAM = 0.5
BYTES_PER_PARAM = 20  # penalty_and_grad_: reads θ, θ*, Ω, g; writes g
# fp32 bytes per parameter of a step: torch's fused AdamW, and with MAS's θ* and Ω read too
ADAMW_BYTES = {"torch AdamW(fused) no penalty": 28, "AdamW+MAS": 36, "AdamW+MAS proximal": 36}
PENALTY_STEPS = ("gradient", "proximal")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def _backends(op: str) -> list:
    out = []
    for name in ("cuda", "triton"):
        reason = backend_status()[name]
        module = ops._load(name)[0]
        if reason is None and op not in getattr(module, "OPS", ()):
            reason = f"the {name} backend has no {op}"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(*LAYER) for _ in range(LAYERS))


_STATE: dict[str, object] = {}


def setup_state() -> tuple[Model, MAS]:
    """One model + consolidated MAS state shared by all rows (θ* = θ + noise, Ω ≥ 0, grads set)."""
    if "model" not in _STATE:
        torch.manual_seed(0)
        model = Model().to(DEVICE)
        mas = MAS(model, lambda_=LAM)
        state = mas.state_dict()
        with torch.no_grad():  # a synthetic consolidated state
            named = dict(model.named_parameters())
            state.update(num_tasks=1, omega={n: torch.rand_like(p) for n, p in named.items()},
                         theta_star={n: p + 0.01 * torch.randn_like(p) for n, p in named.items()})
        mas.load_state_dict(state)
        del state
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        _STATE.update(model=model, mas=mas)
    return _STATE["model"], _STATE["mas"]


def numel() -> int:
    return sum(p.numel() for p in setup_state()[0].parameters())


def _bytes_per_param(group: str, name: str) -> int | None:
    if group == "penalty":
        return BYTES_PER_PARAM
    return next((b for suffix, b in ADAMW_BYTES.items() if name.endswith(suffix)), None)


def _record(group: str, name: str, seconds: float, baseline: bool = False) -> None:
    per_param = _bytes_per_param(group, name)
    gbps = per_param * numel() / seconds / 1e9 if per_param else None
    record(SUITE, group, name, seconds, DEVICE, baseline=baseline, params=numel(), gb_per_s=gbps)


def test_penalty_autograd(benchmark):
    model, mas = setup_state()
    params, theta_star, omega = mas.penalty_terms()

    def run():
        loss = LAM * sum((o * (p - t) ** 2).sum() for p, t, o in zip(params, theta_star, omega))
        loss.backward()

    _record("penalty", "autograd", measure(benchmark, run, DEVICE, rounds=5), baseline=True)


@pytest.mark.parametrize("backend", _backends("penalty_and_grad_"))
def test_penalty_and_grad(benchmark, backend):
    model, mas = setup_state()
    params, theta_star, omega = mas.penalty_terms()
    grads = [p.grad for p in params]
    run = lambda: ops.penalty_and_grad_(params, grads, theta_star, omega, LAM, backend=backend)  # noqa: E731
    _record("penalty", f"{backend} penalty_and_grad_", measure(benchmark, run, DEVICE, rounds=20))


def test_penalty_copy_roof(benchmark):
    n = numel() * BYTES_PER_PARAM // 8  # copy_ reads and writes: 2 × 4 bytes per element
    src = torch.empty(n, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    _record("penalty", "copy_", measure(benchmark, lambda: dst.copy_(src), DEVICE, rounds=20))
    del src, dst


def _adamw_torch(benchmark, with_penalty: bool) -> float:
    model, mas = setup_state()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    params, theta_star, omega = mas.penalty_terms()
    grads = [p.grad.clone() for p in params]

    def run():
        for p, g in zip(params, grads):
            p.grad = g.clone() if with_penalty else g
        if with_penalty:
            loss = LAM * sum((o * (p - t) ** 2).sum() for p, t, o in zip(params, theta_star, omega))
            loss.backward()
        opt.step()

    return measure(benchmark, run, DEVICE, rounds=10)


def test_adamw_fused_no_penalty(benchmark):
    _record("adamw", "torch AdamW(fused) no penalty", _adamw_torch(benchmark, False), baseline=True)


def test_adamw_fused_autograd_penalty(benchmark):
    _record("adamw", "torch AdamW(fused) + autograd penalty", _adamw_torch(benchmark, True))


def _step_name(backend: str, optimizer: str, penalty_step: str) -> str:
    return f"{backend} {optimizer}+MAS" + (" proximal" if penalty_step == "proximal" else "")


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
@pytest.mark.parametrize("backend", _backends("adam_step_"))
def test_adamw_mas(benchmark, backend, penalty_step):
    model, mas = setup_state()
    opt = optim.AdamW(model.parameters(), lr=1e-4, regularizer=mas, backend=backend, penalty_step=penalty_step)
    _record("adamw", _step_name(backend, "AdamW", penalty_step), measure(benchmark, opt.step, DEVICE, rounds=10))


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
@pytest.mark.parametrize("backend", _backends("sgd_step_"))
def test_sgd_mas(benchmark, backend, penalty_step):
    model, mas = setup_state()
    opt = optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, regularizer=mas, backend=backend,
                    penalty_step=penalty_step)
    opt.step()  # momentum buffers exist before timing
    name = _step_name(backend, "SGD", penalty_step)
    _record("sgd", name, measure(benchmark, opt.step, DEVICE, rounds=10), baseline=name == "cuda SGD+MAS")


def _seconds(group: str, name: str) -> float:
    seconds = timings(SUITE).get(group, {}).get(name)
    if seconds is None:
        pytest.skip(f"{group}/{name} was not measured in this run")
    return seconds


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bars(backend):
    """The goals, from this run's rows (fails, with the numbers, when one is missed)."""
    kernel = _seconds("penalty", f"{backend} penalty_and_grad_")
    roof = _seconds("penalty", "copy_") / kernel
    speedup = _seconds("penalty", "autograd") / kernel
    assert roof >= 0.85 and speedup >= 8, f"{backend}: {roof:.2f} of copy_ bandwidth, {speedup:.1f}× autograd"
    if backend == "cuda":
        ratio = _seconds("adamw", "cuda AdamW+MAS") / _seconds("adamw", "torch AdamW(fused) no penalty")
        bytes_ratio = ADAMW_BYTES["AdamW+MAS"] / ADAMW_BYTES["torch AdamW(fused) no penalty"]
        assert ratio <= 1.1, (f"fused AdamW+MAS is {ratio:.2f}× fused AdamW without penalty; it moves "
                              f"{bytes_ratio:.2f}× the bytes, so its bandwidth is {bytes_ratio / ratio:.2f}× torch's")
    for group, optimizer in (("adamw", "AdamW"), ("sgd", "SGD")):
        proximal = _seconds(group, _step_name(backend, optimizer, "proximal"))
        ratio = proximal / _seconds(group, _step_name(backend, optimizer, "gradient"))
        assert ratio <= 1.05, f"{backend} {optimizer}: the proximal step is {ratio:.3f}× the explicit one"
