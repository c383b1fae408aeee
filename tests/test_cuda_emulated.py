"""The CUDA kernels of csrc/cuda, executed on CPU by the emulator in tests/cuda_emulator.

Runs on every CI machine: the real .cu sources (only `<<<>>>` rewritten) run block by block
with 512 emulated threads, barriers and warp shuffles, under UBSan, against the reference
at the launcher's boundaries (65,536-element chunks, 320 blocks and ~50 tensors per launch,
aligned 128-bit and unaligned scalar paths). A GPU run (tests/test_cuda_ops.py) is still
what proves the kernels on hardware; this catches index, chunking, reduction and dtype bugs
where no GPU is at hand.
"""
import re

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

import cuda_emulator
from mas_fast.ops import AdamConfig, SGDConfig, cuda, policy, reference
from multi_tensor_cases import CHUNK, MANY_SIZES, SIZES, terms
from op_cases import CASES, NATIVE, check_outputs, input_dtypes, tensor_args
from test_numerics import huge_penalty_inputs
from tolerances import assert_close

pytestmark = pytest.mark.skipif(cuda_emulator.compiler() is None, reason="no C++ compiler")
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL = (torch.float32, torch.float64, *LOW_PRECISION)


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.EmulatedCuda(cuda_emulator.build())


# Element offsets of the tensors' views: 16-byte aligned (the 128-bit path), unaligned (the
# scalar path), and 16 bytes in (128-bit path; for fp64 not 32-byte aligned).
OFFSETS = pytest.mark.parametrize("offset", ["aligned", "unaligned", "16 bytes"])


def elements(offset, dtype):
    return {"aligned": 0, "unaligned": 1, "16 bytes": 16 // torch.empty((), dtype=dtype).element_size()}[offset]


def sizes_for(dtype):
    """All boundary sizes; the one spanning two launches (21M elements) in fp32 only, for time."""
    return SIZES if dtype == torch.float32 else SIZES[:-1]


# --------------------------------------------------------------------------- random inputs

# Every op with a CUDA kernel, on the property tests' random shapes (0-size, 1-element, long),
# dtypes, strides and hyperparameters, against the brute-force float64 oracles (torch.optim
# itself for the optimizers).
@pytest.mark.parametrize("op", sorted(cuda.OPS))
@given(data=st.data())
def test_op_matches_its_oracle_on_random_inputs(emu, op, data):
    case = CASES[op]
    args = data.draw(case.inputs("cpu", NATIVE), label="args")
    note("shapes: " + ", ".join(f"{tuple(t.shape)}:{t.dtype}:{t.stride()}" for t in tensor_args(args)))
    if op == "per_sample_abs_sum" and torch.float64 in input_dtypes(args):
        event("fp64 importance stays on the reference backend (no CUDA kernel)")
        return
    actual = case.run(getattr(emu, op), args)
    check_outputs(actual, case.brute_force(args), input_dtypes(args), "cpu")


# --------------------------------------------------------------------------- the emulator itself


@pytest.mark.parametrize("fault,message", [
    (0, "the mask names lane 16 of warp 0, which does not exist or has exited"),
    (1, "deadlock in block (0,0,0)"),
    (2, "kernel parameters take 5008 bytes (limit 4096)"),
    (3, "invalid launch configuration: grid (1,1,1), block (2048,1,1)"),
])
def test_emulator_catches_faulty_kernels(emu, fault, message):
    with pytest.raises(cuda_emulator.EmulatorError, match=re.escape(message)):
        emu.fault(fault, torch.zeros(64))


def test_emulator_runs_every_thread_of_a_2d_grid(emu):
    out = torch.full((6 * 64,), -1.0)
    emu.fault(4, out)
    assert torch.equal(out.view(6, 64), torch.arange(64.0).expand(6, 64))


def test_launches_are_rewritten_in_every_kernel_source():
    for path in cuda_emulator.KERNELS.iterdir():
        rewritten = cuda_emulator.rewrite_launches(path.read_text())
        assert "<<<" not in rewritten and ">>>" not in rewritten, path.name


# --------------------------------------------------------------------------- penalty


@pytest.mark.parametrize("dtype", ALL, ids=str)
@OFFSETS
def test_penalty_and_grad_across_chunk_and_launch_boundaries(emu, dtype, offset):
    params, grads, stars, omegas = terms(sizes_for(dtype), dtype, "cpu", offset=elements(offset, dtype))
    want_grads = [g.clone() for g in grads]
    want = reference.penalty_and_grad_(params, want_grads, stars, omegas, 0.7)
    got = emu.penalty_and_grad_(params, grads, stars, omegas, 0.7)
    assert_close(got, want, policy.acc_dtype(dtype))
    for a, b in zip(grads, want_grads):
        assert_close(a, b, dtype)


def test_penalty_over_many_tensors_takes_several_launches(emu):
    params, _, stars, omegas = terms(MANY_SIZES, torch.float32, "cpu")
    assert_close(emu.penalty(params, stars, omegas, 1.3), reference.penalty(params, stars, omegas, 1.3),
                 torch.float32)


def test_penalty_of_empty_tensors_is_zero(emu):
    params, _, stars, omegas = terms([0, 0], torch.float32, "cpu")
    assert emu.penalty(params, stars, omegas, 1.0).item() == 0.0


@pytest.mark.parametrize("dtype", ALL, ids=str)
@OFFSETS
def test_penalty_backward(emu, dtype, offset):
    params, _, stars, omegas = terms([CHUNK + 8, CHUNK + 7, 36, 33, 0], dtype, "cpu", offset=elements(offset, dtype))
    got = emu.penalty_grad(params, stars, omegas, 0.9, upstream=3.0)
    want = reference.penalty_grad(params, stars, omegas, 0.9 * 3.0)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


# --------------------------------------------------------------------------- Ω state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@OFFSETS
def test_merge(emu, dtype, offset):
    dst, src, _, _ = terms(sizes_for(dtype)[:-1] + MANY_SIZES[:100], dtype, "cpu", offset=elements(offset, dtype))
    want = [d.clone() for d in dst]
    reference.merge_(want, src, 0.3, 0.7)
    emu.merge_(dst, src, 0.3, 0.7)
    for a, b in zip(dst, want):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@OFFSETS
def test_running_mean_update(emu, dtype, offset):
    means, sums, _, _ = terms(sizes_for(dtype)[:-1], dtype, "cpu", offset=elements(offset, dtype))
    comps = [torch.randn_like(m) * 1e-7 for m in means]
    want, want_comps = [m.clone() for m in means], [c.clone() for c in comps]
    for count, batch in [(0, 7), (7, 5), (12, 1)]:
        reference.running_mean_update_(want, want_comps, sums, count, batch)
        emu.running_mean_update_(means, comps, sums, count, batch)
    for a, b in zip(means + comps, want + want_comps):
        assert_close(a, b, dtype)


# --------------------------------------------------------------------------- fused optimizers


def optimizer_terms(dtype, offset, lean=False):
    """Boundary-sized tensors plus many small ones; every third parameter uncovered by MAS
    (None for the kernel, Ω = 0 for the reference: the same plain step)."""
    sizes = sizes_for(dtype)[:-1] + MANY_SIZES[:40]
    params, grads, stars, omegas = terms(sizes, dtype, "cpu", offset=elements(offset, dtype), lean=lean)
    covered = [i % 3 != 2 for i in range(len(params))]
    kernel_stars = [s if c else None for s, c in zip(stars, covered)]
    kernel_omegas = [o if c else None for o, c in zip(omegas, covered)]
    ref_omegas = [o if c else torch.zeros_like(o) for o, c in zip(omegas, covered)]
    return params, grads, (kernel_stars, kernel_omegas), (stars, ref_omegas)


def clones(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("options", [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False),
], ids=["plain", "momentum-wd-maximize", "nesterov"])
@OFFSETS
def test_sgd_steps(emu, dtype, options, offset):
    run_sgd_steps(emu, dtype, options, offset)


def run_sgd_steps(emu, dtype, options, offset, lean=False):
    """Three SGD steps of the kernel and of the reference on optimizer_terms."""
    params, grads, kernel_terms, ref_terms = optimizer_terms(dtype, offset, lean)
    want = clones(params)
    bufs = [torch.zeros_like(p) for p in params] if options["momentum"] else []
    want_bufs = clones(bufs)
    for step in range(3):
        config = SGDConfig(lr=0.05, **options)
        got_value = emu.sgd_step_(params, grads, bufs, *kernel_terms, 0.8, config, step == 0)
        want_value = reference.sgd_step_(want, grads, want_bufs, *ref_terms, 0.8, config, step == 0)
        assert_close(got_value, want_value, policy.acc_dtype(dtype), f"penalty at step {step}")
    for a, b in zip(params + bufs, want + want_bufs):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("options", [
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False),
    dict(weight_decay=0.01, decoupled_weight_decay=False, amsgrad=True, maximize=True),
], ids=["adamw", "adam-amsgrad-maximize"])
@OFFSETS
def test_adam_steps(emu, dtype, options, offset):
    run_adam_steps(emu, dtype, options, offset)


def run_adam_steps(emu, dtype, options, offset, lean=False):
    """Three Adam(W) steps of the kernel and of the reference on optimizer_terms."""
    params, grads, kernel_terms, ref_terms = optimizer_terms(dtype, offset, lean)
    want = clones(params)
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]  # exp_avg, exp_avg_sq, max_exp_avg_sq
    want_state = [clones(s) for s in state]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    got_steps = [s.clone() for s in steps]
    config = AdamConfig(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, **options)
    for step in range(1, 4):
        kernel_state = state if options["amsgrad"] else state[:2] + [[]]
        got_value = emu.adam_step_(params, grads, *kernel_state[:3], got_steps, *kernel_terms, 0.8, config)
        want_value = reference.adam_step_(want, grads, *want_state[:2], want_state[2] if options["amsgrad"] else [],
                                          steps, *ref_terms, 0.8, config)
        assert_close(got_value, want_value, policy.acc_dtype(dtype), f"penalty at step {step}")
    for a, b in zip(params + state[0] + state[1], want + want_state[0] + want_state[1]):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_proximal_steps(emu, dtype):
    """penalty_step="proximal" at the launch boundaries, 128-bit path (the random-input test
    above covers the other offsets): SGD with momentum, weight decay and maximize; AdamW with
    amsgrad; three steps each, as the explicit cases above."""
    run_sgd_steps(emu, dtype, dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True,
                                   penalty_step="proximal"), "aligned")
    run_adam_steps(emu, dtype, dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=False,
                                    penalty_step="proximal"), "aligned")


# --------------------------------------------------------------------------- lean state


@pytest.mark.parametrize("dtype", ALL, ids=str)
@OFFSETS
def test_lean_state_penalty_across_chunk_and_launch_boundaries(emu, dtype, offset):
    """θ* in the parameters' dtype and Ω in bf16 (MAS(state_dtype=torch.bfloat16)), read as they
    are: the penalty with its gradient, and its backward, against the reference on the same
    state; a bf16 Ω at an odd offset takes the scalar path, at the others the 128-bit one."""
    params, grads, stars, omegas = terms(sizes_for(dtype)[:-1], dtype, "cpu", offset=elements(offset, dtype),
                                         lean=True)
    want_grads = clones(grads)
    want = reference.penalty_and_grad_(params, want_grads, stars, omegas, 0.7)
    got = emu.penalty_and_grad_(params, grads, stars, omegas, 0.7)
    assert got.dtype == want.dtype == policy.acc_dtype(dtype)
    assert_close(got, want, policy.acc_dtype(dtype))
    for a, b in zip(grads, want_grads):
        assert_close(a, b, dtype)
    for a, b in zip(emu.penalty_grad(params, stars, omegas, 0.9, upstream=3.0),
                    reference.penalty_grad(params, stars, omegas, 0.9 * 3.0)):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype,penalty_step", [(torch.float32, "gradient"), (torch.bfloat16, "proximal")], ids=str)
def test_lean_state_steps(emu, dtype, penalty_step):
    """Both fused steps on the lean state at the launch boundaries, SGD on the scalar path, Adam
    on the 128-bit one (every dtype and option at small sizes: the random-input test above)."""
    run_sgd_steps(emu, dtype, dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
                                   penalty_step=penalty_step), "unaligned", lean=True)
    run_adam_steps(emu, dtype, dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False,
                                    penalty_step=penalty_step), "aligned", lean=True)


# --------------------------------------------------------------------------- importance epilogue


@pytest.mark.parametrize("delta_dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("scale_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(70, 3, 300), (1, 9, 129), (5, 1, 1), (0, 4, 7), (3, 0, 7)], ids=str)
def test_per_sample_abs_sum(emu, delta_dtype, scale_dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    # δ stored (T, B, C) and viewed as (B, T, C): strides the kernel must follow.
    delta = torch.randn(shape[1], shape[0], shape[2], generator=g).to(delta_dtype).transpose(0, 1)
    scale = None if scale_dtype is None else torch.randn(shape, generator=g).to(scale_dtype)
    want = reference.per_sample_abs_sum(delta, scale)
    got = emu.per_sample_abs_sum(delta, scale)
    assert got.dtype == torch.float32
    dtypes = [delta_dtype] + ([scale_dtype] if scale_dtype else [])
    tol = torch.float32 if all(d == torch.float32 for d in dtypes) else torch.bfloat16
    assert_close(got, want, tol)


# --------------------------------------------------------------------------- numerics


def test_huge_importance_does_not_overflow_the_penalty(emu):
    params, stars, omegas, exact, grad = huge_penalty_inputs("cpu")
    got_grad = torch.zeros_like(params[0])
    value = emu.penalty_and_grad_(params, [got_grad], stars, omegas, 1e-6)
    assert torch.isfinite(value), f"penalty overflowed: {value}"
    assert_close(value, exact, torch.float32, "penalty")
    assert_close(got_grad, grad, torch.float32, "gradient")
    sgd_value = emu.sgd_step_([p.clone() for p in params], [torch.zeros_like(params[0])], [], stars, omegas,
                              1e-6, SGDConfig(lr=0.0), False)
    assert_close(sgd_value, exact, torch.float32, "penalty of the fused step")


# --------------------------------------------------------------------------- host grouping


def test_mixed_dtypes_and_step_counts_go_through_the_host_grouping(emu):
    """csrc/cuda/host.cpp splits one call into a launch per dtype (parameter, θ*, Ω: the default
    and the lean state side by side) and per Adam step count, and sums the groups' penalties on
    the device: the result is the reference's on the whole list."""
    lists = [terms([CHUNK + 3, 17], dtype, "cpu", lean=lean)
             for dtype in (torch.float32, torch.bfloat16, torch.float64) for lean in (False, True)]
    params, grads, stars, omegas = ([t for group in lists for t in group[k]] for k in range(4))
    want_grads = clones(grads)
    want = reference.penalty_and_grad_(params, want_grads, stars, omegas, 0.6)
    got = emu.penalty_and_grad_(params, grads, stars, omegas, 0.6)
    assert got.dtype == want.dtype
    assert_close(got, want, torch.float32)
    for a, b in zip(grads, want_grads):
        assert_close(a, b, a.dtype)
    steps = [torch.tensor(float(i % 3)) for i in range(len(params))]  # three step counts per dtype
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    want_p, want_state, want_steps = clones(params), [clones(s) for s in state], clones(steps)
    config = AdamConfig(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    got = emu.adam_step_(params, grads, *state, [], steps, stars, omegas, 0.6, config)
    want = reference.adam_step_(want_p, grads, *want_state, [], want_steps, stars, omegas, 0.6, config)
    assert_close(got, want, torch.float32)
    assert [s.item() for s in steps] == [s.item() for s in want_steps]
    for a, b in zip(params + state[0] + state[1], want_p + want_state[0] + want_state[1]):
        assert_close(a, b, a.dtype)
