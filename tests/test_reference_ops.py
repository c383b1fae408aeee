"""The reference ops against naive per-sample formulas that do build B×P tensors (small sizes)."""
import pytest
import torch
import torch.nn.functional as F

from mas_fast.ops import reference as ref
from tolerances import assert_close

D = torch.float64


def test_abs_matmul():
    d, x = torch.randn(9, 4, dtype=D), torch.randn(9, 6, dtype=D)
    naive = torch.einsum("no,ni->noi", d, x).abs().sum(0)
    assert_close(ref.abs_matmul(d, x), naive, D)


@pytest.mark.parametrize("B,G,T", [(1, 1, 1), (5, 2, 7), (3, 3, 1)])
def test_per_sample_abs_matmul(B, G, T, monkeypatch):
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", "50")
    d, x = torch.randn(B, G, T, 4, dtype=D), torch.randn(B, G, T, 3, dtype=D)
    naive = torch.einsum("bgto,bgti->bgoi", d, x).abs().sum(0)
    assert_close(ref.per_sample_abs_matmul(d, x), naive, D)


def test_per_sample_abs_sum():
    d, s = torch.randn(4, 5, 3, dtype=D), torch.randn(4, 5, 3, dtype=D)
    assert_close(ref.per_sample_abs_sum(d), d.sum(1).abs().sum(0), D)
    assert_close(ref.per_sample_abs_sum(d, s), (d * s).sum(1).abs().sum(0), D)


@pytest.mark.parametrize("stride,padding,dilation,groups,cout,size", [
    ((1, 1), (0, 0), (1, 1), 1, 8, (9, 8)), ((2, 1), (1, 2), (1, 2), 2, 8, (9, 8)),
    # depthwise (one input channel per group): many output pixels, then at most kh·kw of them
    ((1, 3), (2, 0), (2, 1), 4, 8, (9, 8)), ((1, 1), (1, 1), (1, 1), 4, 4, (9, 8)),
    ((2, 1), (1, 0), (1, 2), 4, 8, (4, 5)), ((1, 2), (2, 1), (2, 1), 4, 4, (2, 3)),
    ((1, 1), (1, 1), (1, 1), 4, 4, (1, 1))])
def test_conv_abs_grad(stride, padding, dilation, groups, cout, size):
    torch.manual_seed(0)
    B, cin = 3, 4
    w = torch.randn(cout, cin // groups, 3, 2, dtype=D)
    x = torch.randn(B, cin, *size, dtype=D)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    d = torch.randn_like(y)
    per = []
    for k in range(B):  # naive: autograd per sample
        wk = w.clone().requires_grad_()
        (F.conv2d(x[k:k + 1], wk, None, stride, padding, dilation, groups) * d[k:k + 1]).sum().backward()
        per.append(wk.grad.abs())
    got = ref.conv_abs_grad(d, x, w.shape, stride, padding, dilation, groups)
    assert_close(got, torch.stack(per).sum(0), D)


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_abs_grad(padding_idx):
    torch.manual_seed(0)
    V, B, L, Dm = 7, 4, 6, 3
    idx = torch.randint(0, V, (B, L))
    d = torch.randn(B, L, Dm, dtype=D)
    naive = torch.zeros(B, V, Dm, dtype=D)
    for k in range(B):
        for t in range(L):
            if padding_idx is None or idx[k, t] != padding_idx % V:
                naive[k, idx[k, t]] += d[k, t]
    assert_close(ref.embedding_abs_grad(idx, d, V, padding_idx), naive.abs().sum(0), D)


def test_running_mean_streams_like_one_pass():
    torch.manual_seed(0)
    values = torch.rand(1000, 5, dtype=torch.float32) * 3
    m, c = torch.zeros(5), torch.zeros(5)
    count = 0
    for chunk in values.split(37):
        ref.running_mean_update_([m], [c], [chunk.sum(0)], count, chunk.shape[0])
        count += chunk.shape[0]
    torch.testing.assert_close(m.double(), values.double().mean(0), rtol=1e-6, atol=0)


def test_merge():
    a, b = torch.randn(5), torch.randn(5)
    out = a.clone()
    ref.merge_([out], [b], 0.3, 0.7)
    torch.testing.assert_close(out, 0.3 * a + 0.7 * b)


def test_penalty_and_grad():
    torch.manual_seed(0)
    ps = [torch.randn(3, 4, dtype=D), torch.randn(5, dtype=D)]
    ts = [torch.randn_like(p) for p in ps]
    os_ = [torch.rand_like(p) for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    g0 = [g.clone() for g in gs]
    val = ref.penalty_and_grad_(ps, gs, ts, os_, 1.5)
    want = 1.5 * sum((o * (p - t) ** 2).sum() for p, t, o in zip(ps, ts, os_))
    assert_close(val, want, D)
    for g, g_, p, t, o in zip(gs, g0, ps, ts, os_):
        assert_close(g, g_ + 3.0 * o * (p - t), D)
