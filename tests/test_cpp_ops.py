"""The "cpp" backend (mas_fast._C CPU kernels) against mas_fast/ops/reference.py.

Random tensor lists (0-size, 1-element, odd sizes and one longer than a 65,536-element chunk),
fp32/fp64/bf16/fp16 parameters with the default or the lean θ*/Ω, non-contiguous tensors;
torch.library.opcheck on every op; gradcheck of the penalty's autograd formula; bad input;
dispatch.
"""
from __future__ import annotations

import os

import pytest
import torch

from mas_fast import ops
from mas_fast.ops import AdamConfig, SGDConfig, cpp, policy, reference
from tolerances import TOL, assert_close

requires_ext = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason=str(cpp.unavailable_reason()))

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SHAPES = [(0,), (1,), (7, 13), (3, 1, 5), (65536 + 1027,)]  # the last spans two chunks
STATES = ("full", "lean")  # θ*/Ω in the accumulation dtype, or θ* in the parameters' and Ω in bf16
mt = torch.ops.mas_fast


def acc(dtype: torch.dtype) -> torch.dtype:
    return policy.acc_dtype(dtype)


def layout(t: torch.Tensor, i: int) -> torch.Tensor:
    """Every other tensor non-contiguous (transposed or strided), same values."""
    if i % 2 == 0:
        return t
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


def state_dtypes(dtype: torch.dtype, state: str) -> tuple[torch.dtype, torch.dtype]:
    """(θ*, Ω) dtypes: "full" the accumulation dtype, "lean" θ* in `dtype` and Ω in bfloat16."""
    return (acc(dtype), acc(dtype)) if state == "full" else (dtype, torch.bfloat16)


def make_lists(dtype: torch.dtype, seed: int = 0, shapes=SHAPES, noncontig: bool = True, state: str = "full"):
    """(params, grads, θ*, Ω) with θ* near θ and Ω ≥ 0; params/grads of `dtype`, θ*/Ω in the
    dtypes of `state`."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, dt, positive=False):
        x = torch.rand(shape, generator=g, dtype=torch.float64) if positive else \
            torch.randn(shape, generator=g, dtype=torch.float64)
        return x.to(dt)

    params = [rand(s, dtype) for s in shapes]
    grads = [rand(s, dtype) for s in shapes]
    star_dtype, omega_dtype = state_dtypes(dtype, state)
    theta_star = [(p.double() + 0.1 * rand(p.shape, torch.float64)).to(star_dtype) for p in params]
    omega = [rand(s, omega_dtype, positive=True) for s in shapes]
    if noncontig:
        params, grads, theta_star, omega = ([layout(t, i + k) for i, t in enumerate(lst)]
                                            for k, lst in enumerate((params, grads, theta_star, omega)))
    return params, grads, theta_star, omega


def clone(ts):
    """Copies with the same strides (in-place targets keep their layout)."""
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t) for t in ts]


def test_extension_built_when_required():
    if os.environ.get("MAS_FAST_REQUIRE_EXT", "0") not in ("", "0"):
        assert ops.backend_status()["cpp"] is None


def test_info_reports_the_cpp_backend(capsys):
    from mas_fast.__main__ import info

    info()
    line = next(row for row in capsys.readouterr().out.splitlines() if row.split()[:1] == ["cpp"])
    assert line.split(None, 1)[1] == ("available" if cpp.unavailable_reason() is None
                                      else f"unavailable: {cpp.unavailable_reason()}")


def test_unavailable_reason_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "No module named 'mas_fast._C'")
    reason = cpp.unavailable_reason()
    assert "mas_fast._C is not built" in reason and "pip install --no-build-isolation -e ." in reason


@requires_ext
def test_auto_picks_cpp_for_cpu_tensors():
    assert ops.select("penalty", "auto", [torch.zeros(3)]) is cpp


# --------------------------------------------------------------------------- penalty


@requires_ext
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_penalty_value_and_grad(dtype, state):
    params, _, theta_star, omega = make_lists(dtype, state=state)
    params = [p.requires_grad_() for p in params]
    lam = 0.7
    got = cpp.penalty(params, theta_star, omega, lam)
    want = reference.penalty([p.double() for p in params], [t.double() for t in theta_star],
                             [o.double() for o in omega], lam)
    assert got.dtype == acc(dtype)
    assert_close(got, want, acc(dtype), "penalty value")
    got_g = torch.autograd.grad(got * 1.5, params)
    want_g = torch.autograd.grad(reference.penalty(params, theta_star, omega, lam) * 1.5, params)
    for a, b in zip(got_g, want_g):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, "penalty grad")


@requires_ext
def test_penalty_gradcheck():
    params, _, theta_star, omega = make_lists(torch.float64, shapes=[(3, 4), (5,), (0,)])
    params = [p.detach().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *ps: cpp.penalty(list(ps), theta_star, omega, 0.3), params)


@requires_ext
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_penalty_and_grad(dtype, state):
    params, grads, theta_star, omega = make_lists(dtype, seed=1, state=state)
    got_grads, want_grads = clone(grads), clone(grads)
    got = cpp.penalty_and_grad_(params, got_grads, theta_star, omega, 1.3)
    want = reference.penalty_and_grad_(params, want_grads, theta_star, omega, 1.3)
    assert_close(got, want, acc(dtype), "penalty value")
    for a, b, g0 in zip(got_grads, want_grads, grads):
        assert a.stride() == g0.stride()
        assert_close(a, b, dtype, "grads")


@requires_ext
def test_penalty_mixed_dtypes_and_thread_count_independence():
    p32, g32, t32, o32 = make_lists(torch.float32, seed=2)
    p16, g16, t16, o16 = make_lists(torch.bfloat16, seed=3)
    args = (p32 + p16, t32 + t16, o32 + o16, 0.9)
    want = reference.penalty(*args)
    threads = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            values.append(cpp.penalty(*args))
    finally:
        torch.set_num_threads(threads)
    assert values[0].item() == values[1].item() == values[2].item()  # fixed summation order
    assert_close(values[0], want, torch.float32, "mixed-dtype penalty")


@requires_ext
def test_empty_lists():
    assert cpp.penalty([], [], [], 1.0).item() == 0.0
    assert cpp.penalty_and_grad_([], [], [], [], 1.0).item() == 0.0
    cpp.merge_([], [], 1.0, 1.0)
    cpp.running_mean_update_([], [], [], 0, 1)


# --------------------------------------------------------------------------- state ops


@requires_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.3, 0.7)])
def test_merge(dtype, a, b):
    _, _, dst, src = make_lists(dtype, seed=4)
    got, want = clone(dst), clone(dst)
    cpp.merge_(got, src, a, b)
    reference.merge_(want, src, a, b)
    for x, y in zip(got, want):
        assert_close(x, y, dtype, "merge")


@requires_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_running_mean_update(dtype):
    _, _, means, sums = make_lists(dtype, seed=5)
    comps = [0.01 * m for m in means]
    got_m, got_c, want_m, want_c = clone(means), clone(comps), clone(means), clone(comps)
    for count, batch in ((0, 4), (4, 3), (7, 1000)):
        cpp.running_mean_update_(got_m, got_c, sums, count, batch)
        reference.running_mean_update_(want_m, want_c, sums, count, batch)
    for x, y in zip(got_m + got_c, want_m + want_c):
        assert_close(x, y, dtype, "running mean / compensation")


# --------------------------------------------------------------------------- fused optimizer steps

SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-2, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True),
]
ADAM_OPTIONS = [
    dict(weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False),
    dict(weight_decay=1e-2, decoupled_weight_decay=False, amsgrad=True, maximize=True),
    dict(weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=True, maximize=False),
]


def run_sgd(impl, params, grads, buffers, theta_star, omega, init, options):
    return impl.sgd_step_(params, grads, buffers if options["momentum"] else [], theta_star, omega, 0.8,
                          SGDConfig(lr=0.05, **options), init)


@requires_ext
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=str)
@pytest.mark.parametrize("penalised", ["full", "lean", None])
def test_sgd_step(dtype, options, penalised):
    params, grads, theta_star, omega = make_lists(dtype, seed=6, state=penalised or "full")
    if not penalised:
        theta_star, omega = [], []
    buffers = [torch.randn(p.shape).to(dtype) for p in params]
    got_p, got_b, want_p, want_b = clone(params), clone(buffers), clone(params), clone(buffers)
    for init in (True, False):  # first step (buffer ← g), then one with history
        got = run_sgd(cpp, got_p, grads, got_b, theta_star, omega, init, options)
        want = run_sgd(reference, want_p, grads, want_b, theta_star, omega, init, options)
        assert_close(got, want, acc(dtype), "penalty value")
    for x, y in zip(got_p + got_b, want_p + want_b):
        assert_close(x, y, dtype, "params / momentum buffers")


def run_adam(impl, params, grads, state, steps, theta_star, omega, options):
    m, v, vmax = state
    return impl.adam_step_(params, grads, m, v, vmax if options["amsgrad"] else [], steps, theta_star, omega,
                           0.8, AdamConfig(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, **options))


@requires_ext
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=str)
@pytest.mark.parametrize("penalised", ["full", "lean", None])
def test_adam_step(dtype, options, penalised):
    params, grads, theta_star, omega = make_lists(dtype, seed=7, state=penalised or "full")
    if not penalised:
        theta_star, omega = [], []
    state = [[torch.zeros(p.shape, dtype=dtype) for p in params] for _ in range(3)]
    got_p, want_p = clone(params), clone(params)
    got_s, want_s = [clone(s) for s in state], [clone(s) for s in state]
    got_steps, want_steps = [torch.tensor(0.0) for _ in params], [torch.tensor(0.0) for _ in params]
    for _ in range(3):
        got = run_adam(cpp, got_p, grads, got_s, got_steps, theta_star, omega, options)
        want = run_adam(reference, want_p, grads, want_s, want_steps, theta_star, omega, options)
        assert_close(got, want, acc(dtype), "penalty value")
    assert [s.item() for s in got_steps] == [3.0] * len(params)
    for x, y in zip(got_p + sum(got_s, []), want_p + sum(want_s, [])):
        assert_close(x, y, dtype, "params / moments")


# --------------------------------------------------------------------------- opcheck


def opcheck_cases(dtype: torch.dtype = torch.float32, state: str = "full"):
    params, grads, theta_star, omega = make_lists(dtype, shapes=[(3, 4), (0,), (5,)], state=state)
    like = lambda: [torch.rand(p.shape).to(dtype) for p in params]  # noqa: E731
    steps = [torch.tensor(2.0) for _ in params]
    return {
        "penalty": (mt.penalty.default, ([p.requires_grad_() for p in clone(params)], theta_star, omega, 0.5)),
        "penalty_backward": (mt.penalty_backward.default, (torch.tensor(1.5), params, theta_star, omega, 0.5)),
        "penalty_and_grad_": (mt.penalty_and_grad_.default, (params, clone(grads), theta_star, omega, 0.5)),
        "merge_": (mt.merge_.default, (like(), like(), 0.3, 0.7)),
        "running_mean_update_": (mt.running_mean_update_.default, (like(), like(), like(), 10, 3)),
        "sgd_step_": (mt.sgd_step_.default, (clone(params), grads, like(), theta_star, omega, 0.5, 0.1, 0.9, 0.0,
                                             0.01, True, False, False)),
        "adam_step_": (mt.adam_step_.default, (clone(params), grads, like(), like(), like(), steps, theta_star,
                                               omega, 0.5, 0.1, 0.9, 0.99, 1e-8, 0.01, True, True, False)),
    }


OPCHECKED = ("adam_step_", "merge_", "penalty", "penalty_and_grad_", "penalty_backward", "running_mean_update_",
             "sgd_step_")


@requires_ext
@pytest.mark.parametrize("name", OPCHECKED)
def test_opcheck(name):
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["penalty", "penalty_backward", "penalty_and_grad_", "sgd_step_", "adam_step_"])
def test_opcheck_lean_state(name, dtype):
    """The fakes agree with the kernels on the lean state too (a float32 penalty for a bf16 Ω)."""
    op, args = opcheck_cases(dtype, "lean")[name]
    torch.library.opcheck(op, args)


@requires_ext
def test_every_op_has_an_opcheck():
    """Every op with a CPU kernel is opchecked: here, or per_sample_abs_matmul in
    tests/test_cpp_importance.py. (dir(torch.ops.mas_fast) lists only the ops used so far.)"""
    declared = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("mas_fast::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")}
    assert set(OPCHECKED) == set(opcheck_cases())
    assert declared == set(OPCHECKED) | {"per_sample_abs_matmul"}


# --------------------------------------------------------------------------- bad input


@requires_ext
def test_bad_input_raises_before_mutating():
    params, grads, theta_star, omega = make_lists(torch.float32, shapes=[(4,), (2, 3)], noncontig=False)
    before = clone(grads)
    cases = [
        (ValueError, "theta_star has 1 tensors", (params, grads, theta_star[:1], omega, 1.0)),
        (ValueError, r"omega\[1\] has shape", (params, grads, theta_star, [omega[0], omega[1].t()], 1.0)),
        (TypeError, r"omega\[0\] is Half, expected Float or BFloat16",
         (params, grads, theta_star, [omega[0].half(), omega[1]], 1.0)),
        (TypeError, r"theta_star\[1\] is BFloat16, expected Float \(params\[1\] is Float\)",
         (params, grads, [theta_star[0], theta_star[1].bfloat16()], omega, 1.0)),
        (TypeError, r"grads\[1\] is Double", (params, [grads[0], grads[1].double()], theta_star, omega, 1.0)),
        (TypeError, r"params\[0\] is Long", ([params[0].long(), params[1]], grads, theta_star, omega, 1.0)),
    ]
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            mt.penalty_and_grad_(*args)
        for g, g0 in zip(grads, before):
            assert torch.equal(g, g0)


@requires_ext
@pytest.mark.parametrize("op", ["penalty_and_grad_", "sgd_step_", "adam_step_"])
def test_a_bad_third_tensor_leaves_everything_unwritten(op):
    """The error names list and index, and comes before the first two tensors are written."""
    params, grads, theta_star, omega = make_lists(torch.float32, shapes=[(4,), (2, 3), (5,)], noncontig=False)
    state = [torch.ones_like(p) for p in params]
    steps = [torch.tensor(1.0) for _ in params]
    bad = [*omega[:2], omega[2].double()]
    calls = {
        "penalty_and_grad_": lambda: mt.penalty_and_grad_(params, grads, theta_star, bad, 1.0),
        "sgd_step_": lambda: mt.sgd_step_(params, grads, state, theta_star, bad, 1.0, 0.1, 0.9, 0.0, 0.0, False,
                                          False, False),
        "adam_step_": lambda: mt.adam_step_(params, grads, state, clone(state), [], steps, theta_star, bad, 1.0,
                                            0.1, 0.9, 0.99, 1e-8, 0.0, False, False, False),
    }
    before = [clone(ts) for ts in (params, grads, state)]
    with pytest.raises(TypeError, match=r"omega\[2\] is Double, expected Float"):
        calls[op]()
    for written, saved in zip((params, grads, state), before):
        assert all(torch.equal(a, b) for a, b in zip(written, saved))
    assert [s.item() for s in steps] == [1.0, 1.0, 1.0]


@requires_ext
def test_adam_bad_step_counter_leaves_state_unchanged():
    params, grads, _, _ = make_lists(torch.float32, shapes=[(4,)], noncontig=False)
    p0, m, v = params[0].clone(), torch.zeros(4), torch.zeros(4)
    good, bad = torch.tensor(1.0), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"steps\[0\] must be a one-element"):
        mt.adam_step_(params, grads, [m], [v], [], [bad], [], [], 0.0, 0.1, 0.9, 0.99, 1e-8, 0.0, False, False, False)
    with pytest.raises(ValueError, match="max_exp_avg_sqs must be empty"):
        mt.adam_step_(params, grads, [m], [v], [v.clone()], [good], [], [], 0.0, 0.1, 0.9, 0.99, 1e-8, 0.0, False,
                      False, False)
    assert torch.equal(params[0], p0) and good.item() == 1.0 and not m.any() and not v.any()


@requires_ext
def test_not_supported_reasons_and_explicit_backend():
    meta = [torch.zeros(3, device="meta")]
    assert "CPU tensors only" in " ".join(cpp.not_supported_reasons("penalty", meta))
    assert "supports" in " ".join(cpp.not_supported_reasons("merge_", [torch.zeros(3, dtype=torch.float16)]))
    assert cpp.not_supported_reasons("penalty", [torch.zeros(3, dtype=torch.bfloat16)]) == []
    with pytest.raises(ops.BackendUnavailable, match="merge_ supports"):
        ops.merge_([torch.zeros(2, dtype=torch.half)], [torch.zeros(2, dtype=torch.half)], 1.0, 1.0, backend="cpp")
