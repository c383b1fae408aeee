"""Numerical robustness, on every backend that implements the op:

- 10⁷ samples streamed through `running_mean_update_` stay within 1e-6 relative of float64;
- Ω near the float32 limit does not overflow the penalty (accumulated in float64);
- deterministic mode (`torch.use_deterministic_algorithms(True)`) gives bit-identical Ω.
"""
import pytest
import torch

from backends import combos
from mas_fast import MAS, ops
from mas_fast.ops import AdamConfig, SGDConfig
from models import make_case
from tolerances import assert_close

D64 = torch.float64
SAMPLES = 10**7
WIDTH = 257  # elements per tensor: odd, several vector lanes


def _stream(updates: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Batch sizes summing to 10⁷ samples, their fp32 batch sums (U[0.5, 2]-mean importances with
    noise), and the float64 mean of everything streamed."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(updates, generator=g, dtype=D64) + 0.5
    sizes = (weights / weights.sum() * SAMPLES).floor().long()
    sizes[-1] += SAMPLES - sizes.sum()
    mu = torch.rand(WIDTH, generator=g, dtype=D64) * 1.5 + 0.5
    noise = torch.randn(updates, WIDTH, generator=g, dtype=D64)
    sums = (sizes[:, None] * mu + sizes[:, None].sqrt() * 0.3 * noise).float()
    return sizes.tolist(), sums, sums.double().sum(0) / SAMPLES


def _streamed_mean(sizes, sums, backend: str, device: str, compensated: bool = True) -> torch.Tensor:
    mean, comp = torch.zeros(WIDTH, device=device), torch.zeros(WIDTH, device=device)
    sums, count = sums.to(device), 0
    for n, s in zip(sizes, sums):
        ops.running_mean_update_([mean], [comp], [s], count, n, backend=backend)
        if not compensated:
            comp.zero_()
        count += n
    return mean.double().cpu()


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got - exact).abs() / exact.abs()).max().item()


@pytest.mark.parametrize("combo", combos(["running_mean_update_"]), ids=str)
def test_ten_million_samples_stay_within_1e_6_of_float64(combo):
    # the Triton interpreter costs ~30 ms an update: the same 10⁷ samples in fewer, larger batches
    sizes, sums, exact = _stream(200 if combo.emulated else 10_000)
    got = _streamed_mean(sizes, sums, combo.backend, combo.device)
    assert _relative_error(got, exact) <= 1e-6


def test_the_uncompensated_update_would_drift_past_1e_6():
    """Guards the test above: without the Kahan term, 10⁴ fp32 updates exceed the bound."""
    sizes, sums, exact = _stream(10_000)
    assert _relative_error(_streamed_mean(sizes, sums, "reference", "cpu", compensated=False), exact) > 1e-6


def huge_penalty_inputs(device: str):
    """Ω near the fp32 limit on 4096 elements, |θ − θ*| = 1 or 2: every term fits in fp32 only
    when computed in a wider type, and their sum (~1e42) overflows fp32 by four orders of
    magnitude, while λ = 1e-6 brings the penalty (~1e36) back into range."""
    g = torch.Generator().manual_seed(0)
    omega = (torch.rand(4096, generator=g, dtype=D64) * 0.5 + 0.5) * 3e38
    step = torch.randint(1, 3, (4096,), generator=g).to(D64) * torch.randn(4096, generator=g, dtype=D64).sign()
    theta_star = torch.randn(4096, generator=g, dtype=D64)
    params, star, om = (theta_star + step).float(), theta_star.float(), omega.float()
    exact = 1e-6 * (om.double() * (params.double() - star.double()) ** 2).sum()
    grad = 2e-6 * om.double() * (params.double() - star.double())
    return [params.to(device)], [star.to(device)], [om.to(device)], exact, grad


@pytest.mark.parametrize("combo", combos(["penalty", "penalty_and_grad_"]), ids=str)
def test_huge_importance_does_not_overflow_the_penalty(combo):
    params, star, omega, exact, grad = huge_penalty_inputs(combo.device)
    if combo.op == "penalty":
        leaf = params[0].clone().requires_grad_()
        value = ops.penalty([leaf], star, omega, 1e-6, backend=combo.backend)
        (got_grad,) = torch.autograd.grad(value, [leaf])
    else:
        got_grad = torch.zeros_like(params[0])
        value = ops.penalty_and_grad_(params, [got_grad], star, omega, 1e-6, backend=combo.backend)
    assert value.dtype == torch.float32 and torch.isfinite(value), f"penalty overflowed: {value}"
    assert_close(value.cpu(), exact, torch.float32, "penalty")
    assert_close(got_grad.cpu(), grad, torch.float32, "gradient")


@pytest.fixture
def deterministic_mode():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


BACKEND_DEVICES = sorted({(c.backend, c.device) for c in combos()})


@pytest.mark.usefixtures("deterministic_mode")
@pytest.mark.parametrize("case", ["cnn", "seq"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def test_deterministic_mode_gives_bit_identical_importance(backend, device, case):
    model, x = make_case(case, dtype=torch.float32, batch=9)
    model, x = model.to(device), x.to(device)
    runs = []
    for _ in range(2):
        mas = MAS(model, backend=backend)
        mas.consolidate([x[:5], x[5:]], progress=False)
        runs.append(mas.importance)
    for name, omega in runs[0].items():
        assert torch.equal(omega, runs[1][name]), f"{name} differs between runs"


# --------------------------------------------------------------------------- overflow
# A penalty beyond the float32 range is inf, as in reference.py (terms in float64, converted
# at the end), never an error: every kernel backend returns what the reference returns.

KERNEL_BACKENDS = ("cpp", "cuda")
OVERFLOW_OPS = ["penalty", "penalty_and_grad_", "sgd_step_", "adam_step_"]
SGD = SGDConfig(lr=0.5, momentum=0.9)
ADAM = AdamConfig(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)


def overflow_inputs(device: str):
    """fp32 (params, grads, θ*, Ω) with Ω ≈ 1e10: at λ = 1e30 both the penalty (~1e43) and
    most gradient entries (2λΩ|θ−θ*| ~ 1e40) exceed the float32 range."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 7), (300,), (2, 3, 4)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    stars = [p + torch.randn(p.shape, generator=g) for p in params]
    omegas = [torch.rand(s, generator=g) * 1e10 + 1e9 for s in shapes]
    return [[t.to(device) for t in ts] for ts in (params, grads, stars, omegas)]


def _same(got, want, what: str) -> None:
    """Equal up to fp32 round-off, with inf and NaN in the same places."""
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=0.0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _run(module, op: str, lam: float, inputs, steps: int):
    """(value, tensors it writes) after `steps` calls of `op` from `module` on copies of `inputs`."""
    params, grads, stars, omegas = [[t.clone() for t in ts] for ts in inputs]
    if op == "penalty":
        return module.penalty(params, stars, omegas, lam), []
    if op == "penalty_and_grad_":
        return module.penalty_and_grad_(params, grads, stars, omegas, lam), grads
    if op == "sgd_step_":
        bufs = [torch.zeros_like(p) for p in params]
        for step in range(steps):
            value = module.sgd_step_(params, grads, bufs, stars, omegas, lam, SGD, step == 0)
        return value, params + bufs
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    counters = [torch.zeros(()) for _ in params]
    for _ in range(steps):
        value = module.adam_step_(params, grads, *state, [], counters, stars, omegas, lam, ADAM)
    return value, params + state[0] + state[1]


# λ = 1e30 overflows every op at once; λ = 1e6 makes fused SGD diverge over a few steps (Adam's
# normalised step does not diverge).
OVERFLOW_CASES = [(c, 1e30, 1) for c in combos(OVERFLOW_OPS) if c.backend in KERNEL_BACKENDS] + \
                 [(c, 1e6, 12) for c in combos(["sgd_step_"]) if c.backend in KERNEL_BACKENDS]


@pytest.mark.parametrize("combo,lam,steps", OVERFLOW_CASES, ids=[f"{c}-lam{lam:g}" for c, lam, _ in OVERFLOW_CASES])
def test_overflow_gives_what_the_reference_gives(combo, lam, steps):
    inputs = overflow_inputs(combo.device)
    want, want_written = _run(ops.reference, combo.op, lam, inputs, steps)
    got, got_written = _run(ops._load(combo.backend)[0], combo.op, lam, inputs, steps)
    assert not torch.isfinite(want), "the case must overflow the reference"
    assert got.dtype == want.dtype
    _same(got, want, "value")
    for i, (a, b) in enumerate(zip(got_written, want_written)):
        _same(a, b, f"written tensor {i}")
