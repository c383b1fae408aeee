"""The Triton fused SGD / Adam(W) steps (mas_fast/ops/triton/optim.py) against the reference:
mixed dtypes and layouts in one call (two chunks, odd, empty, transposed, strided), explicit and
proximal, several Adam step counts in one call; their custom ops under opcheck; bad input.

On CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU), on the GPU where there is one. Random shapes and options: tests/test_properties.py.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mas_fast import ops
from mas_fast.ops import AdamConfig, SGDConfig, reference
from tolerances import assert_close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or ops.backend_status()["triton"]
                                is not None, reason=f"triton backend: {ops.backend_status()['triton']}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PENALTY_STEPS = ["gradient", "proximal"]
LEAN = torch.bfloat16


def step_lists(seed: int = 0, lean: bool = False):
    """Parameters of mixed dtypes and layouts, their gradients, θ* and Ω (fp32; with `lean` θ* in
    the parameter's dtype and Ω in bf16)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    params = [rand(300), rand(3, 7).t(), rand(11, dtype=torch.bfloat16), rand(0),
              rand(5, 8, dtype=torch.float16)[:, ::2]]
    grads = [rand(*p.shape, dtype=p.dtype) for p in params]
    stars = [p.float() + 0.1 * rand(*p.shape) for p in params]
    omegas = [rand(*p.shape).abs() * 10 for p in params]
    if lean:
        stars = [t.to(p.dtype) for t, p in zip(stars, params)]
        omegas = [o.to(LEAN) for o in omegas]
    return params, grads, stars, omegas


def clones(ts):
    return [t.clone() for t in ts]


def assert_all_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.stride() == b.stride(), f"{what} {i}: layout kept"
        assert_close(a.cpu(), b.cpu(), a.dtype, f"{what} {i}")


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
@pytest.mark.parametrize("covered", [True, False])
def test_sgd_step_matches_the_reference(penalty_step, covered):
    params, grads, stars, omegas = step_lists()
    if not covered:
        stars, omegas = [], []
    bufs = [torch.randn_like(p.float()).to(p.dtype) for p in params]  # the transposed one stays transposed
    config = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, penalty_step=penalty_step)
    got_p, got_b, want_p, want_b = clones(params), clones(bufs), clones(params), clones(bufs)
    for init in (True, False):
        got = ops.sgd_step_(got_p, grads, got_b, stars, omegas, 0.7, config, init_buffers=init, backend="triton")
        want = reference.sgd_step_(want_p, grads, want_b, stars, omegas, 0.7, config, init)
        assert got.dtype == torch.float32
        assert_close(got.cpu(), want, torch.float32, "penalty before the step")
    assert_all_close(got_p, want_p, "θ")
    assert_all_close(got_b, want_b, "momentum buffer")


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
@pytest.mark.parametrize("decoupled,amsgrad", [(True, True), (False, False)])
def test_adam_step_matches_the_reference(penalty_step, decoupled, amsgrad):
    params, grads, stars, omegas = step_lists(seed=1)
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(float(s)) for s in (0, 4, 0, 2, 9)]  # launched per step count
    config = AdamConfig(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=decoupled, amsgrad=amsgrad,
                        penalty_step=penalty_step)
    got = [clones(params), *map(clones, states), clones(steps)]
    want = [clones(params), *map(clones, states), clones(steps)]
    for _ in range(2):
        for impl, (p, m, v, vmax, s) in ((ops.adam_step_, got), (reference.adam_step_, want)):
            kw = {"backend": "triton"} if impl is ops.adam_step_ else {}
            value = impl(p, grads, m, v, vmax if amsgrad else [], s, stars, omegas, 0.7, config, **kw)
            assert value.dtype == torch.float32
    for name, a, b in zip(("θ", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"), got, want):
        assert_all_close(a, b, name)


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
def test_steps_read_the_lean_state(penalty_step):
    """θ* in the parameters' dtypes and Ω in bf16 (MAS(state_dtype=torch.bfloat16)): SGD and
    Adam against the reference on the same lean state."""
    params, grads, stars, omegas = step_lists(seed=2, lean=True)
    bufs = [torch.randn_like(p.float()).to(p.dtype) for p in params]
    config = SGDConfig(lr=0.1, momentum=0.9, penalty_step=penalty_step)
    got_p, got_b, want_p, want_b = clones(params), clones(bufs), clones(params), clones(bufs)
    got = ops.sgd_step_(got_p, grads, got_b, stars, omegas, 0.7, config, backend="triton")
    want = reference.sgd_step_(want_p, grads, want_b, stars, omegas, 0.7, config, False)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got.cpu(), want, torch.float32, "penalty before the SGD step")
    assert_all_close(got_p, want_p, "θ after SGD")
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    adam = AdamConfig(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True, penalty_step=penalty_step)
    got = [clones(params), *map(clones, states), [torch.tensor(0.0) for _ in params]]
    want = [clones(params), *map(clones, states), [torch.tensor(0.0) for _ in params]]
    got_value = ops.adam_step_(got[0], grads, got[1], got[2], [], got[3], stars, omegas, 0.7, adam, backend="triton")
    want_value = reference.adam_step_(want[0], grads, want[1], want[2], [], want[3], stars, omegas, 0.7, adam)
    assert_close(got_value.cpu(), want_value, torch.float32, "penalty before the Adam step")
    for name, a, b in zip(("θ", "exp_avg", "exp_avg_sq"), got, want):
        assert_all_close(a, b, f"{name} after Adam")


def test_empty_lists_step_nothing():
    assert float(ops.sgd_step_([], [], [], [], [], 1.0, SGDConfig(lr=0.1), backend="triton")) == 0.0
    assert float(ops.adam_step_([], [], [], [], [], [], [], [], 1.0, AdamConfig(lr=0.1), backend="triton")) == 0.0


@pytest.mark.parametrize("call,exc,match", [
    (lambda p, g, s, o: ops.sgd_step_(p, g[:1], [], s, o, 1.0, SGDConfig(lr=0.1), backend="triton"),
     ValueError, "grads has 1 tensors"),
    (lambda p, g, s, o: ops.sgd_step_(p, [x.half() for x in g], [], s, o, 1.0, SGDConfig(lr=0.1),
                                      backend="triton"), TypeError, r"grads\[0\] is torch.float16"),
    (lambda p, g, s, o: ops.sgd_step_(p, g, [], s, [x.half() for x in o], 1.0, SGDConfig(lr=0.1),
                                      backend="triton"), TypeError,
     r"omega\[0\] is torch.float16, expected torch.float32 or torch.bfloat16"),
    (lambda p, g, s, o: ops.sgd_step_(p, g, [], s, o, 1.0, SGDConfig(lr=0.1, momentum=0.9), backend="triton"),
     ValueError, "momentum_buffers has 0 tensors"),
    (lambda p, g, s, o: ops.adam_step_(p, g, clones(p), clones(p), [], [torch.zeros(2)], s, o, 1.0,
                                       AdamConfig(lr=0.1), backend="triton"), ValueError, "steps has 1 tensors"),
])
def test_bad_input_raises_before_any_write(call, exc, match):
    params = [torch.randn(4, device=DEVICE), torch.randn(3, device=DEVICE)]
    grads = clones(params)
    stars, omegas = clones(params), [p.abs() for p in params]
    before = clones(params)
    with pytest.raises(exc, match=match):
        call(params, grads, stars, omegas)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("proximal", [False, True])
@pytest.mark.parametrize("name", ["sgd_step_", "adam_step_"])
def test_opcheck(name, proximal):
    """Schema, fake kernel and dispatch of the custom ops mas_fast_triton::sgd_step_ / adam_step_."""
    params, grads, stars, omegas = step_lists(seed=2)
    like = [torch.zeros_like(p) for p in params]
    if name == "sgd_step_":
        args = (clones(params), grads, clones(like), stars, omegas, 0.5, 0.1, 0.9, 0.0, 0.01, True, False, False,
                proximal)
    else:
        steps = [torch.tensor(3.0) for _ in params]
        args = (clones(params), grads, clones(like), clones(like), clones(like), steps, stars, omegas, 0.5, 0.1,
                0.9, 0.99, 1e-8, 0.01, True, True, False, proximal)
    torch.library.opcheck(getattr(torch.ops.mas_fast_triton, name).default, args)
