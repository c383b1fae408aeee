"""Triton kernels against mas_fast.ops.reference: odd shapes, dtypes, strides, bad input.

On a machine without a GPU they run on CPU tensors in Triton's interpreter (conftest.py
sets TRITON_INTERPRET=1), and on CUDA tensors when a GPU is present. The interpreter is
slow: shapes stay tiny but cross the interpreter's 32-wide tiles and 256-element chunks,
so multi-tile, multi-step and split reductions all run.
fp32 results must match the reference within the fp32 tolerance; bf16/fp16 results are
checked flash-attention style (error vs an fp64 reference ≤ 2× a same-dtype PyTorch one).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mas_fast import ops
from mas_fast.ops import BackendUnavailable
from mas_fast.ops import reference as ref
from tolerances import assert_close, assert_close_lowp

_REASON = ops.backend_status()["triton"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

if _REASON is None:
    from mas_fast.ops import triton as tb
    from mas_fast.ops.triton import custom_ops as lib

    DEVICES = (["cpu"] if tb.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
else:
    DEVICES = ["cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
T = torch.Tensor


def rand(*shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0) -> T:
    """Random values in the given memory layout: contiguous, transposed (last two dims) or strided."""
    g = torch.Generator().manual_seed(seed)
    storage = list(shape)
    if layout == "transposed":
        storage[-2:] = storage[-1:-3:-1]
    elif layout == "strided":
        storage[-1] *= 2
    out = torch.randn(storage, generator=g).to(dtype=dtype, device=device)
    if layout == "transposed":
        out = out.transpose(-1, -2)
    elif layout == "strided":
        out = out[..., ::2]
    assert layout == "contiguous" or not out.is_contiguous() or 1 in shape
    return out


def _same_dtype(fn, *args):
    """The reference computed in the inputs' own dtype (no upcast): PyTorch's low-precision result."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "acc_dtype", lambda *dtypes: dtypes[0])
        return fn(*args)


def check(got: T, fn, *args, dtype: torch.dtype, msg: str = "") -> None:
    """`got` (the kernel's fp32 result) against the reference `fn` on the same inputs."""
    assert got.dtype == torch.float32, msg
    args = [a.cpu() if isinstance(a, T) else a for a in args]
    got = got.cpu()
    if dtype == torch.float32:
        assert_close(got, fn(*args), torch.float32, msg)
    else:
        up = [a.double() if isinstance(a, T) else a for a in args]
        assert_close_lowp(got, fn(*up), _same_dtype(fn, *args), msg)


# --------------------------------------------------------------------------- importance GEMMs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,O,I,layout", [
    (1, 1, 1, "contiguous"),
    (37, 9, 19, "transposed"),   # odd sizes, column-major operands
    (100, 5, 7, "strided"),      # one output tile: the rows are split over programs
    (20, 40, 33, "contiguous"),  # several output tiles
])
def test_abs_matmul(device, dtype, N, O, I, layout):
    delta = rand(N, O, dtype=dtype, device=device, layout=layout, seed=1)
    x = rand(N, I, dtype=dtype, device=device, layout=layout, seed=2)
    got = ops.abs_matmul(delta, x, backend="triton")
    check(got, ref.abs_matmul, delta, x, dtype=dtype, msg=f"abs_matmul {N}x{O}x{I} {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,G,T_,O,I,layout", [
    (1, 1, 1, 3, 5, "contiguous"),   # B = 1, T = 1
    (5, 2, 7, 33, 18, "strided"),    # groups, odd sizes, two O tiles
    (3, 1, 40, 8, 6, "transposed"),  # T longer than one position block
    (9, 3, 2, 4, 4, "contiguous"),   # few tiles: samples split over programs
])
def test_per_sample_abs_matmul(device, dtype, B, G, T_, O, I, layout):
    delta = rand(B, G, T_, O, dtype=dtype, device=device, layout=layout, seed=3)
    x = rand(B, G, T_, I, dtype=dtype, device=device, layout=layout, seed=4)
    got = ops.per_sample_abs_matmul(delta, x, backend="triton")
    check(got, ref.per_sample_abs_matmul, delta, x, dtype=dtype, msg=f"per_sample {B, G, T_, O, I}")


CONV_CASES = [  # stride, padding, dilation, groups, kernel, layout of x
    ((1, 1), (0, 0), (1, 1), 1, (3, 2), "contiguous"),
    ((2, 1), (1, 2), (1, 2), 2, (3, 2), "channels_last"),
    ((1, 3), (2, 0), (2, 1), 4, (3, 2), "contiguous"),
    ((1, 2), (0, 1), (1, 1), 1, (1, 3), "strided"),  # a Conv1d seen as height-1 Conv2d
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,padding,dilation,groups,kernel,layout", CONV_CASES)
def test_conv_abs_grad(device, dtype, stride, padding, dilation, groups, kernel, layout):
    B, c_in, c_out = 3, 4, 8
    height = 1 if kernel[0] == 1 else 9
    x = rand(B, c_in, height, 8, seed=5)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = rand(B, c_in, height, 8, layout="strided", seed=5)
    weight_shape = (c_out, c_in // groups) + kernel
    out_shape = F.conv2d(x, torch.zeros(weight_shape), None, stride, padding, dilation, groups).shape
    delta = rand(*out_shape, layout="transposed", seed=6).to(dtype=dtype, device=device)
    x = x.to(dtype=dtype, device=device)
    got = ops.conv_abs_grad(delta, x, weight_shape, stride, padding, dilation, groups, backend="triton")
    assert got.shape == weight_shape
    check(got, ref.conv_abs_grad, delta, x, weight_shape, stride, padding, dilation, groups, dtype=dtype,
          msg=f"conv {stride, padding, dilation, groups}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T_,C,layout", [
    (1, 1, 1, "contiguous"), (4, 6, 5, "strided"), (7, 70, 3, "transposed"), (5, 3, 40, "contiguous")])
@pytest.mark.parametrize("with_scale", [False, True])
def test_per_sample_abs_sum(device, dtype, B, T_, C, layout, with_scale):
    delta = rand(B, T_, C, dtype=dtype, device=device, layout=layout, seed=7)
    scale = rand(B, T_, C, dtype=dtype, device=device, seed=8) if with_scale else None
    got = ops.per_sample_abs_sum(delta, scale, backend="triton")
    check(got, ref.per_sample_abs_sum, delta, scale, dtype=dtype, msg=f"abs_sum {B, T_, C}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_reductions_give_zeros(device):
    def z(*shape):
        return torch.zeros(*shape, device=device)

    assert torch.equal(ops.abs_matmul(z(0, 3), z(0, 4), backend="triton").cpu(), torch.zeros(3, 4))
    assert ops.abs_matmul(z(5, 0), z(5, 4), backend="triton").shape == (0, 4)
    assert torch.equal(ops.per_sample_abs_matmul(z(0, 2, 3, 4), z(0, 2, 3, 5), backend="triton").cpu(),
                       torch.zeros(2, 4, 5))
    assert torch.equal(ops.per_sample_abs_sum(z(3, 0, 4), backend="triton").cpu(), torch.zeros(4))


# --------------------------------------------------------------------------- multi-tensor state ops


def state_lists(device, seed=0):
    """Parameters of mixed dtypes and layouts (two chunks, odd, empty, non-contiguous), θ*, Ω."""
    params = [rand(300, device=device, seed=seed), rand(7, 3, device=device, layout="transposed", seed=seed + 1),
              rand(11, dtype=torch.bfloat16, device=device, seed=seed + 2), rand(0, device=device),
              rand(5, 4, dtype=torch.float16, device=device, layout="strided", seed=seed + 3)]
    theta_star = [rand(*p.shape, device=device, seed=seed + 10 + i) for i, p in enumerate(params)]
    omega = [rand(*p.shape, device=device, seed=seed + 20 + i).abs() for i, p in enumerate(params)]
    return params, theta_star, omega


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_value_and_autograd(device):
    params, theta_star, omega = state_lists(device)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    mirror = [p.detach().cpu().clone().requires_grad_() for p in params]
    got = ops.penalty(leaves, theta_star, omega, 0.7, backend="triton")
    want = ref.penalty(mirror, [t.cpu() for t in theta_star], [o.cpu() for o in omega], 0.7)
    assert got.dtype == torch.float32 and got.requires_grad
    assert_close(got.detach().cpu(), want.detach(), torch.float32, "penalty")
    (3.0 * got).backward()
    (3.0 * want).backward()
    for i, (a, b) in enumerate(zip(leaves, mirror)):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad.cpu(), b.grad, a.dtype, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_and_grad_(device):
    params, theta_star, omega = state_lists(device)
    grads = [rand(*p.shape, dtype=p.dtype, device=device, seed=40 + i) for i, p in enumerate(params)]
    grads[1] = grads[1].t().contiguous().t()  # non-contiguous grad: written back in place
    before = [g.clone().cpu() for g in grads]
    cpu = [[t.cpu() for t in ts] for ts in (params, theta_star, omega)]
    ref_grads = [g.clone() for g in before]
    got = ops.penalty_and_grad_(params, grads, theta_star, omega, 0.7, backend="triton")
    want = ref.penalty_and_grad_(cpu[0], ref_grads, cpu[1], cpu[2], 0.7)
    assert_close(got.cpu(), want, torch.float32, "penalty value")
    for i, (g, p, t, o) in enumerate(zip(grads, *cpu)):
        if p.dtype == torch.float32:
            assert_close(g.cpu(), ref_grads[i], torch.float32, f"grad {i}")
        else:
            exact = before[i].double() + 1.4 * o.double() * (p.double() - t.double())
            assert_close_lowp(g.cpu(), exact, ref_grads[i], f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_reads_the_lean_state(device):
    """θ* in the parameters' dtypes and Ω in bf16 (MAS(state_dtype=torch.bfloat16)): the value,
    its autograd gradient and penalty_and_grad_ against the reference on the same lean state."""
    params, theta_star, omega = state_lists(device, seed=5)
    theta_star = [t.to(p.dtype) for t, p in zip(theta_star, params)]
    omega = [o.to(torch.bfloat16) for o in omega]
    cpu = [[t.detach().cpu() for t in ts] for ts in (params, theta_star, omega)]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    mirror = [p.clone().requires_grad_() for p in cpu[0]]
    got = ops.penalty(leaves, theta_star, omega, 0.7, backend="triton")
    want = ref.penalty(mirror, cpu[1], cpu[2], 0.7)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got.detach().cpu(), want.detach(), torch.float32, "penalty")
    got.backward()
    want.backward()
    for i, (a, b) in enumerate(zip(leaves, mirror)):
        assert_close(a.grad.cpu(), b.grad, a.dtype, f"grad {i}")
    grads = [torch.zeros_like(p) for p in params]
    ref_grads = [torch.zeros_like(p) for p in cpu[0]]
    value = ops.penalty_and_grad_(params, grads, theta_star, omega, 0.7, backend="triton")
    assert_close(value.cpu(), ref.penalty_and_grad_(cpu[0], ref_grads, cpu[1], cpu[2], 0.7), torch.float32)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a.cpu(), b, a.dtype, f"penalty_and_grad_ grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_merge_(device):
    dst = [rand(300, device=device), rand(6, 5, device=device, layout="transposed", seed=1), rand(0, device=device)]
    src = [rand(300, device=device, seed=2), rand(6, 5, dtype=torch.bfloat16, device=device, seed=3),
           rand(0, device=device)]
    expected = [d.clone().cpu() for d in dst]
    ref.merge_(expected, [s.cpu() for s in src], 0.3, 0.7)
    ops.merge_(dst, src, 0.3, 0.7, backend="triton")
    for i, (a, b) in enumerate(zip(dst, expected)):
        assert_close(a.cpu(), b, torch.float32, f"merge {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_running_mean_update_matches_reference(device):
    means = [rand(300, device=device).abs(), rand(4, 3, device=device, layout="transposed", seed=1).abs()]
    comps = [torch.zeros_like(m) for m in means]
    sums = [rand(*m.shape, device=device, seed=2 + i).abs() * 5 for i, m in enumerate(means)]
    ref_means, ref_comps = [m.clone().cpu() for m in means], [c.clone().cpu() for c in comps]
    ops.running_mean_update_(means, comps, sums, 10, 5, backend="triton")
    ref.running_mean_update_(ref_means, ref_comps, [s.cpu() for s in sums], 10, 5)
    for a, b in zip(means, ref_means):
        assert_close(a.cpu(), b, torch.float32, "mean")


@pytest.mark.parametrize("device", DEVICES)
def test_running_mean_streams_like_one_pass(device):
    values = torch.rand(1000, 5, generator=torch.Generator().manual_seed(0)) * 3
    m, c = torch.zeros(5, device=device), torch.zeros(5, device=device)
    count = 0
    for chunk in values.split(37):
        ops.running_mean_update_([m], [c], [chunk.sum(0).to(device)], count, chunk.shape[0], backend="triton")
        count += chunk.shape[0]
    torch.testing.assert_close(m.cpu().double(), values.double().mean(0), rtol=1e-6, atol=0)


def test_empty_lists():
    assert float(ops.penalty([], [], [], 1.0, backend="triton")) == 0.0
    assert float(ops.penalty_and_grad_([], [], [], [], 1.0, backend="triton")) == 0.0
    ops.merge_([], [], 0.5, 0.5, backend="triton")
    ops.running_mean_update_([], [], [], 0, 3, backend="triton")


# --------------------------------------------------------------------------- dispatch and bad input


def test_float64_is_refused_with_a_reason():
    d = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        ops.abs_matmul(d, d, backend="triton")
    assert ops.select("abs_matmul", "auto", (d, d)) is not tb


def test_auto_never_picks_the_interpreter():
    d = torch.randn(4, 3)
    assert ops.select("abs_matmul", "auto", (d, d)) is not tb
    reasons = tb.not_supported_reasons("abs_matmul", [d, d.to(torch.int64)])
    assert any("int64" in r for r in reasons)


def test_unsupported_op_and_embedding_falls_back():
    assert "embedding_abs_grad" not in tb.OPS
    assert tb.not_supported_reasons("embedding_abs_grad", [])
    d = torch.randn(2, 3, 4)
    idx = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(ops.embedding_abs_grad(idx, d, 5, backend="triton"),
                               ref.embedding_abs_grad(idx, d, 5))


def on(*shape, dtype=torch.float32):
    """Random tensor on the device the tests run on (so that only the bad shape is wrong)."""
    return torch.randn(*shape, dtype=dtype, device=DEVICES[0])


@pytest.mark.parametrize("call,match", [
    (lambda: ops.abs_matmul(on(3, 2), on(4, 2), backend="triton"), "differ in rows"),
    (lambda: ops.abs_matmul(on(3), on(3, 2), backend="triton"), "delta must be 2-D"),
    (lambda: ops.per_sample_abs_matmul(on(2, 1, 3, 4), on(2, 1, 5, 4), backend="triton"), "differ in"),
    (lambda: ops.per_sample_abs_sum(on(2, 3, 4), on(2, 3, 5), backend="triton"), "scale"),
    (lambda: ops.conv_abs_grad(on(2, 8, 3, 3), on(2, 4, 5, 5), (8, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1,
                               backend="triton"), "weight_shape"),
    (lambda: ops.conv_abs_grad(on(2, 8, 3, 3), on(2, 4, 5, 5), (8, 4, 3, 3), (1,), (0, 0), (1, 1), 1,
                               backend="triton"), "stride"),
])
def test_bad_shapes_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_lists_raise_and_leave_state_unchanged():
    dst, src = [on(4), on(3)], [on(4)]
    before = [d.clone() for d in dst]
    with pytest.raises(ValueError, match="src has 1 tensors"):
        ops.merge_(dst, src, 0.5, 0.5, backend="triton")
    with pytest.raises(ValueError, match=r"src\[1\] has shape"):
        ops.merge_(dst, [on(4), on(5)], 0.5, 0.5, backend="triton")
    with pytest.raises(TypeError, match=r"dst\[0\] must be float32"):
        ops.merge_([on(4, dtype=torch.float16)], [on(4)], 0.5, 0.5, backend="triton")
    assert all(torch.equal(d, b) for d, b in zip(dst, before))
    p, g = [on(3)], [on(3, dtype=torch.float16)]
    g0 = g[0].clone()
    with pytest.raises(TypeError, match=r"grads\[0\] is torch.float16"):
        ops.penalty_and_grad_(p, g, [on(3)], [on(3)], 1.0, backend="triton")
    assert torch.equal(g[0], g0)


# --------------------------------------------------------------------------- torch.library


def _opcheck_cases():
    d2, x2 = torch.randn(5, 3), torch.randn(5, 4)
    d4, x4 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 5)
    dc, xc = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 5, 5)
    p = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    ts, om = [torch.randn(3), torch.randn(2, 2)], [torch.rand(3), torch.rand(2, 2)]
    return [
        (lib.abs_matmul, (d2, x2)),
        (lib.per_sample_abs_matmul, (d4, x4)),
        (lib.conv_abs_grad, (dc, xc, [4, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)),
        (lib.per_sample_abs_sum, (torch.randn(2, 3, 4), torch.randn(2, 3, 4))),
        (lib.per_sample_abs_sum, (torch.randn(2, 3, 4), None)),
        (lib.merge_, ([torch.randn(3)], [torch.randn(3)], 0.5, 0.5)),
        (lib.running_mean_update_, ([torch.randn(3)], [torch.zeros(3)], [torch.randn(3)], 2, 1)),
        (lib.penalty, (p, ts, om, 0.5)),
        (lib.penalty_and_grad_, ([t.detach() for t in p], [torch.zeros(3), torch.zeros(2, 2)], ts, om, 0.5)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of each custom op."""
    op, args = _opcheck_cases()[case]
    device = DEVICES[0]

    def move(a):
        if isinstance(a, list):
            return [move(t) for t in a]
        return a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, T) else a

    torch.library.opcheck(op, tuple(move(a) for a in args))


def test_fp32_dot_precision_follows_torch():
    from mas_fast.ops.triton._runtime import dot_precision

    if tb.INTERPRET:
        assert dot_precision(torch.device("cpu")) == "ieee"
        return
    device = torch.device("cuda")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_precision(device) in ("tf32", "ieee")
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(device) in ("tf32x3", "ieee")
    finally:
        torch.set_float32_matmul_precision(old)




# --------------------------------------------------------------------------- compiled (GPU) path

_COMPILE_SCRIPT = r'''
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mas_fast.ops.triton import gemm, multi_tensor as mt, optim, reduce

def build(kernel, arch, warps, **args):
    """Compile to a cubin (through ptxas) without a GPU: str "*.." = pointer, int/float = i32/fp32,
    anything else (and UPPER-case names) = constexpr."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    sig, const = {}, {}
    for name in kernel.arg_names:
        v = args[name]
        if isinstance(v, str) and v.startswith("*"):
            sig[name] = v
        elif name.isupper() or not isinstance(v, (int, float)):
            sig[name], const[name] = "constexpr", v
        else:
            sig[name] = "fp32" if isinstance(v, float) else "i32"
    triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=warps, num_stages=3))

arch = int(sys.argv[1])
tiles = dict(BLOCK_O=128, BLOCK_I=128, BLOCK_T=32, GROUP=8, UPCAST=False, PRECISION="tf32x3")
ints = dict.fromkeys("B O I T WO H W KH KW stride_h stride_w pad_h pad_w dil_h dil_w".split(), 3)
strides = dict.fromkeys("sdt sdo sxt sxi s_split sdb sdg sdp sdq sxb sxg sxc sxh sxw s_group".split(), 7)
for p in ("*fp32", "*bf16"):
    build(gemm._abs_gemm_kernel, arch, 8, d_ptr=p, x_ptr=p, out_ptr="*fp32", rows_per_prog=64,
          **ints, **strides, **tiles)
    for im2col in (False, True):
        build(gemm._per_sample_gemm_kernel, arch, 8, d_ptr=p, x_ptr=p, out_ptr="*fp32", samples_per_prog=2,
              IM2COL=im2col, **ints, **strides, **tiles)
    build(reduce._per_sample_abs_sum_kernel, arch, 4, d_ptr=p, s_ptr=p, out_ptr="*fp32", B=3, T=5, C=7,
          samples_per_prog=2, sdb=7, sdt=7, sdc=7, ssb=7, sst=7, ssc=7, HAS_SCALE=True, BLOCK_T=32, BLOCK_C=256)
tables = dict(addrs="*i64", numels="*i64", chunk_tensor="*i64", chunk_start="*i64", n_tensors=3,
              CHUNK=65536, BLOCK=1024)
for mode in (0, 1, 2):
    for state in (tl.float32, tl.bfloat16):  # θ*/Ω in fp32, or the lean state
        build(mt._penalty_kernel, arch, 4, partial_ptr="*fp32", grad_scale_ptr="*fp32", two_lam=0.5,
              P_DTYPE=tl.bfloat16, TS_DTYPE=state, OM_DTYPE=state, G_DTYPE=tl.bfloat16, GRAD_MODE=mode,
              WITH_LOSS=mode != 2, INTERPRET=False, **tables)
lean = dict(P_DTYPE=tl.bfloat16, TS_DTYPE=tl.bfloat16, OM_DTYPE=tl.bfloat16, PENALTY=True, PROXIMAL=True,
            MAXIMIZE=False, INTERPRET=False, partial_ptr="*fp64", **tables)
build(optim._sgd_kernel, arch, 4, two_lam=0.5, lr=0.1, lr_two_lam=0.1, momentum=0.9, keep=1.0, weight_decay=0.0,
      MOMENTUM=True, INIT_BUFFERS=False, NESTEROV=False, WEIGHT_DECAY=False, **lean)
build(optim._adam_kernel, arch, 4, two_lam=0.5, lr_two_lam=0.1, w1=0.1, beta2=0.999, w2=0.001, eps=1e-8,
      weight_decay=0.0, decay=1.0, neg_step=-0.1, bc2_sqrt=0.5, AMSGRAD=True, L2=False, DECOUPLED=True,
      SMALL_W1=True, **lean)
build(mt._merge_kernel, arch, 4, a=0.5, b=0.5, S_DTYPE=tl.bfloat16, **tables)
build(mt._running_mean_kernel, arch, 4, batch_count=3.0, total=5.0, S_DTYPE=tl.float32, **tables)
'''


@pytest.mark.parametrize("arch", [90])
def test_kernels_compile_for_gpus(arch):
    """Every kernel variant compiles to a Hopper cubin (no GPU needed): the CPU run of the
    tests interprets the kernels, so this is CI's only check of the compiled path."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
