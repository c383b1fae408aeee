"""The proximal penalty step (`penalty_step="proximal"`) of the fused SGD / Adam(W) steps.

Every backend usable here on CPU that implements the steps (reference, cpp, the CUDA emulator's
twin in test_cuda_emulated, triton under TRITON_INTERPRET=1) against float64 closed forms
written independently of the kernels: θ ← (θ' + 2ηλΩθ*) / (1 + 2ηλΩ), θ' torch.optim's step on
the loss gradient alone. Random shapes and hyper-parameters: tests/op_cases.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backends import combos
from mas_fast import MAS, ops, optim
from mas_fast.ops import AdamConfig, SGDConfig
from tolerances import assert_close

D64 = torch.float64
SGD_BACKENDS = sorted({c.backend for c in combos(["sgd_step_"]) if c.device == "cpu"})
ADAM_BACKENDS = sorted({c.backend for c in combos(["adam_step_"]) if c.device == "cpu"})


def quadratic(n: int = 64, omega_value: float = 3.0, seed: int = 0):
    """(θ0, a, θ*, Ω): the loss ½‖θ − a‖² (gradient θ − a) under the penalty λΩ(θ−θ*)²."""
    gen = torch.Generator().manual_seed(seed)
    theta0, a, star = (torch.randn(n, generator=gen) for _ in range(3))
    return theta0, a, star, torch.full((n,), omega_value)


def run_sgd(backend: str, penalty_step: str, steps: int, lr: float = 0.5, lam: float = 1.0,
            omega_value: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """θ after `steps` fused SGD steps on the quadratic, and its minimiser (a + 2λΩθ*)/(1 + 2λΩ)."""
    theta, a, star, omega = quadratic(omega_value=omega_value)
    config = SGDConfig(lr=lr, penalty_step=penalty_step)
    for _ in range(steps):
        ops.sgd_step_([theta], [theta - a], [], [star], [omega], lam, config, backend=backend)
    return theta, (a + 2 * lam * omega * star) / (1 + 2 * lam * omega)


@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_explicit_sgd_diverges_where_the_proximal_step_converges(backend):
    # 2ηλΩ = 3 > 2: the explicit step multiplies θ − θ_min by 1 − η(1 + 2λΩ) = −2.5 each step.
    explicit, minimiser = run_sgd(backend, "gradient", steps=30)
    assert not torch.isfinite(explicit).all() or (explicit - minimiser).abs().max() > 1e6
    proximal, minimiser = run_sgd(backend, "proximal", steps=30)
    torch.testing.assert_close(proximal, minimiser, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 2ηλΩ = inf, on purpose
@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_proximal_is_exact_for_any_lambda(backend):
    """Ω·λ up to the float32 limit: θ* itself, never inf or NaN (2ηλΩ = inf gives θ*)."""
    theta, a, star, _ = quadratic()
    omega = torch.full_like(theta, 3e38)
    for lam in (1e3, 1e30):
        p = theta.clone()
        value = ops.sgd_step_([p], [p - a], [], [star], [omega], lam, SGDConfig(lr=0.1, penalty_step="proximal"),
                              backend=backend)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, star, rtol=0, atol=1e-6)
        assert value.dtype == torch.float32 and torch.isinf(value)  # λΣΩd² beyond float32


@pytest.mark.parametrize("backend", SGD_BACKENDS)
@pytest.mark.parametrize("init_buffers", [True, False])
def test_sgd_momentum_buffer_holds_the_loss_direction_only(backend, init_buffers):
    """One step with momentum, nesterov and weight decay equals the closed form
    (θ − η·d + 2ηλΩθ*) / (1 + 2ηλΩ), d and the buffer torch.optim's from the loss gradient alone."""
    theta, grad, star, _ = quadratic(n=33)
    omega = torch.rand(33, generator=torch.Generator().manual_seed(1)) * 50
    buf = torch.randn(33, generator=torch.Generator().manual_seed(2))
    lr, lam = 0.2, 0.7
    kw = dict(lr=lr, momentum=0.9, weight_decay=0.01, nesterov=True)
    leaf = torch.nn.Parameter(theta.to(D64).clone())
    leaf.grad = grad.to(D64)
    want_opt = torch.optim.SGD([leaf], foreach=False, **kw)
    if not init_buffers:
        want_opt.state[leaf]["momentum_buffer"] = buf.to(D64).clone()
    theta_d = leaf.detach().clone()
    want_opt.step()
    d = (theta_d - leaf.detach()) / lr  # the step SGD takes from the loss gradient alone
    c = 2 * lr * lam * omega.to(D64)
    want = (theta_d - lr * d + c * star.to(D64)) / (1 + c)

    p, b = theta.clone(), buf.clone()
    ops.sgd_step_([p], [grad], [b], [star], [omega], lam, SGDConfig(**kw, penalty_step="proximal"),
                  init_buffers=init_buffers, backend=backend)
    assert_close(p, want, torch.float32, "θ")
    assert_close(b, want_opt.state[leaf]["momentum_buffer"], torch.float32, "momentum buffer")


@pytest.mark.parametrize("backend", ADAM_BACKENDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_proximal_is_the_decoupled_closed_form(backend, decoupled):
    """Adam's moments see the loss gradient only; θ ← (θ' + 2ηλΩθ*) / (1 + 2ηλΩ) after it."""
    theta, grad, star, _ = quadratic(n=40)
    omega = torch.rand(40, generator=torch.Generator().manual_seed(3)) * 100
    lr, lam = 1e-2, 2.0
    kw = dict(lr=lr, weight_decay=0.05, amsgrad=True)
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    leaf = torch.nn.Parameter(theta.to(D64).clone())
    leaf.grad = grad.to(D64)
    want_opt = make([leaf], foreach=False, **kw)
    want_opt.step()
    c = 2 * lr * lam * omega.to(D64)
    want = (leaf.detach() + c * star.to(D64)) / (1 + c)

    p, m, v, vmax, step = theta.clone(), torch.zeros(40), torch.zeros(40), torch.zeros(40), torch.tensor(0.0)
    config = AdamConfig(lr=lr, weight_decay=0.05, amsgrad=True, decoupled_weight_decay=decoupled,
                        penalty_step="proximal")
    ops.adam_step_([p], [grad], [m], [v], [vmax], [step], [star], [omega], lam, config, backend=backend)
    assert_close(p, want, torch.float32, "θ")
    state = want_opt.state[leaf]
    for name, got in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
        assert_close(got, state[name], torch.float32, name)


# --------------------------------------------------------------------------- the optimizers


def consolidated_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    mas = MAS(model, lambda_=50.0)
    mas.consolidate([torch.randn(32, 10)], progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = [(torch.randn(8, 10), torch.randint(0, 3, (8,))) for _ in range(8)]
    return model, mas.state_dict(), data


def train(model, mas_state, data, make_opt, loss_scale: float = 1.0, backend: str = "reference"):
    model = copy.deepcopy(model)
    mas = MAS(model, lambda_=50.0, backend=backend)
    mas.load_state_dict(mas_state)
    opt = make_opt(model.parameters(), mas)
    for x, y in data:
        before = mas.penalty().detach()
        opt.zero_grad()
        (loss_scale * F.cross_entropy(model(x), y)).backward()
        opt.step()
        assert_close(opt.last_penalty, before, torch.float32, "last_penalty: λΣΩ(θ−θ*)² before the step")
    return model, opt


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=1e-2)),
                                     ("AdamW", dict(lr=1e-2, amsgrad=True))])
def test_optimizers_take_the_proximal_step_on_every_backend(name, kw):
    model, mas_state, data = consolidated_model()
    backends = SGD_BACKENDS if name == "SGD" else ADAM_BACKENDS
    runs = {b: train(model, mas_state, data, lambda ps, mas: getattr(optim, name)(
        ps, regularizer=mas, penalty_step="proximal", backend=b, **kw), backend=b) for b in backends}
    ref_model, ref_opt = runs["reference"]
    explicit, _ = train(model, mas_state, data, lambda ps, mas: getattr(optim, name)(ps, regularizer=mas, **kw))
    assert any(not torch.allclose(p, q) for p, q in zip(ref_model.parameters(), explicit.parameters()))
    for b, (m, opt) in runs.items():
        assert opt.param_groups[0]["penalty_step"] == "proximal"
        for p, q in zip(m.parameters(), ref_model.parameters()):
            assert_close(p, q, torch.float32, f"{name} proximal on {b}")


def test_adam_proximal_pull_does_not_depend_on_the_loss_scale():
    """Adam is invariant to the gradient's scale; with the proximal step so is the penalty's pull,
    while the explicit penalty gradient is rescaled by √v and its strength drifts with the loss."""
    model, mas_state, data = consolidated_model()

    def distance_after(penalty_step: str, scale: float) -> list[torch.Tensor]:
        m, _ = train(model, mas_state, data, lambda ps, mas: optim.Adam(
            ps, lr=1e-2, eps=1e-12, regularizer=mas, penalty_step=penalty_step), loss_scale=scale)
        return list(m.parameters())

    for a, b in zip(distance_after("proximal", 1.0), distance_after("proximal", 1e3)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    explicit = zip(distance_after("gradient", 1.0), distance_after("gradient", 1e3))
    assert any((a - b).abs().max() > 1e-3 for a, b in explicit)


def test_penalty_step_round_trips_in_the_state_dict_and_is_checked():
    model = torch.nn.Linear(3, 2)
    opt = optim.AdamW(model.parameters(), penalty_step="proximal")
    again = optim.AdamW(model.parameters())
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["penalty_step"] == "proximal"
    with pytest.raises(ValueError, match="penalty_step must be one of"):
        optim.SGD(model.parameters(), penalty_step="implicit")
    with pytest.raises(ValueError, match="penalty_step must be one of"):
        SGDConfig(lr=0.1, penalty_step="prox")
    with pytest.raises(ValueError, match="penalty_step must be one of"):
        optim.Adam([{"params": model.parameters(), "penalty_step": "exact"}])
    mixed = optim.SGD([{"params": [model.weight], "penalty_step": "proximal"}, {"params": [model.bias]}], lr=0.1)
    assert [g["penalty_step"] for g in mixed.param_groups] == ["proximal", "gradient"]
