"""The fused CPU per-sample kernel (mas_fast::per_sample_abs_matmul, csrc/cpu/importance.cpp)
and the cpp backend's importance ops against mas_fast/ops/reference.py.

The kernel is called directly on every shape (the cpp backend sends only some shapes to it):
non-powers of two, T = 1, rows narrower than a tile, very wide rows, several groups, all four
dtypes, non-contiguous inputs; then the cpp ops where they use it; opcheck; bad input.
"""
from __future__ import annotations

import pytest
import torch

from mas_fast import ops
from mas_fast.ops import cpp, reference
from mas_fast.ops.policy import acc_dtype
from tolerances import TOL, assert_close

pytestmark = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason=str(cpp.unavailable_reason()))

kernel = torch.ops.mas_fast.per_sample_abs_matmul
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SHAPES = [  # (B, G, T, O, I)
    (1, 1, 1, 1, 1), (3, 1, 5, 7, 9), (5, 2, 1, 33, 65), (4, 3, 16, 6, 32), (2, 1, 3, 13, 4099),
    (7, 1, 17, 70, 31), (0, 1, 4, 5, 6), (6, 4, 9, 1, 49),
]


def _inputs(shape, dtype, seed=0):
    B, G, T, O, I = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, G, T, O, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(B, G, T, I, generator=g, dtype=torch.float64).to(dtype))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (last two dimensions transposed in memory)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    d, x = _inputs(shape, dtype)
    want = reference.per_sample_abs_matmul(d, x)
    got = kernel(_strided(d), x[:, :, :, :].transpose(0, 1).contiguous().transpose(0, 1))
    assert got.dtype == acc_dtype(dtype) and got.shape == want.shape
    assert_close(got, want, acc_dtype(dtype), f"{shape} {dtype}")


def test_kernel_matches_float64_brute_force():
    d, x = _inputs((9, 2, 11, 21, 37), torch.float32, seed=1)
    brute = torch.einsum("bgto,bgti->bgoi", d.double(), x.double()).abs().sum(0)
    assert_close(kernel(d, x), brute.float(), torch.float32)


@pytest.mark.parametrize("groups,stride,padding,dilation,size", [
    (1, (1, 1), (1, 1), (1, 1), 4), (1, (2, 2), (1, 1), (1, 1), 7), (2, (1, 2), (0, 1), (2, 1), 6),
    (1, (1, 1), (1, 1), (1, 1), 1),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_conv_abs_grad_matches_reference(groups, stride, padding, dilation, size, dtype):
    """Output maps of 1-16 pixels and ≥ 4 output channels per group: the kernel's shapes."""
    g = torch.Generator().manual_seed(2)
    cin, cout, k = 3 * groups, 5 * groups, (3, 3)
    x = torch.randn(5, cin, size, size + 1, generator=g).to(dtype)
    y = torch.nn.functional.conv2d(x.double(), torch.zeros(cout, 3, *k, dtype=torch.float64), None, stride,
                                   padding, dilation, groups)
    delta = torch.randn(y.shape, generator=g).to(dtype)
    shape = (cout, 3, *k)
    want = reference.conv_abs_grad(delta, x, shape, stride, padding, dilation, groups)
    got = cpp.conv_abs_grad(delta, x, shape, stride, padding, dilation, groups)
    assert_close(got, want, acc_dtype(dtype), f"{dtype}")


def test_auto_dispatches_the_importance_ops_to_cpp_on_cpu():
    d, x = _inputs((2, 1, 4, 5, 6), torch.float32)
    assert ops.select("per_sample_abs_matmul", "auto", (d, x)) is cpp
    assert ops.select("conv_abs_grad", "auto", (d, x)) is cpp


def test_opcheck():
    d, x = _inputs((3, 2, 5, 7, 9), torch.float32)
    torch.library.opcheck(kernel, (d, x))


@pytest.mark.parametrize("d,x,error,match", [
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), ValueError, "delta must be"),
    (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 4, 4), ValueError, "differ in"),
    (torch.zeros(2, 1, 3, 4, dtype=torch.int32), torch.zeros(2, 1, 3, 4), TypeError, "delta is Int"),
])
def test_bad_input(d, x, error, match):
    with pytest.raises(error, match=match):
        kernel(d, x)
