"""Multi-tensor state ops (apex MultiTensorApply style): one launch covers many tensors.

Each launch gets a table of tensor addresses and sizes and a list of fixed-size chunks
(tensor index, start); program i works on chunk i. Tensors are grouped by dtype, one
launch per dtype combination (the element type of a pointer is a compile-time constant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._runtime import CHUNK, CHUNK_BLOCK, INTERPRET

Tensor = torch.Tensor

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _chunk(numels, chunk_tensor, chunk_start, CHUNK: tl.constexpr):
    """(tensor index, first element, end) of this program's chunk."""
    pid = tl.program_id(0)
    index = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    return index, start, tl.minimum(start + CHUNK, tl.load(numels + index))


@triton.jit
def _ptr(addrs, n_tensors, group: tl.constexpr, index, DTYPE: tl.constexpr):
    """Pointer to tensor `index` of address row `group`."""
    return tl.load(addrs + group * n_tensors + index).to(tl.pointer_type(DTYPE), bitcast=True)


@triton.jit
def _cast(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 → DTYPE, round to nearest even (done by hand where the interpreter would truncate bf16)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def _penalty_kernel(addrs, numels, chunk_tensor, chunk_start, n_tensors, partial_ptr, grad_scale_ptr,
                    two_lam, P_DTYPE: tl.constexpr, TS_DTYPE: tl.constexpr, OM_DTYPE: tl.constexpr,
                    G_DTYPE: tl.constexpr, GRAD_MODE: tl.constexpr, WITH_LOSS: tl.constexpr,
                    INTERPRET: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows: θ, θ* (fp32 or, lean, θ's dtype), Ω (fp32 or bf16) and, with GRAD_MODE, g.
    partial[chunk] = Σ Ω(θ − θ*)² (fp64).

    GRAD_MODE 0: no gradient; 1: g += 2λΩ(θ − θ*); 2: g = s·2λΩ(θ − θ*), s read from
    grad_scale_ptr (the backward of the penalty). Terms are computed in fp64, as in the
    reference: Ω near the fp32 limit times (θ − θ*)² may overflow fp32 although λ·Σ fits.
    """
    index, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    p = _ptr(addrs, n_tensors, 0, index, P_DTYPE)
    ts = _ptr(addrs, n_tensors, 1, index, TS_DTYPE)
    om = _ptr(addrs, n_tensors, 2, index, OM_DTYPE)
    coef = two_lam
    if GRAD_MODE == 2:
        coef = coef * tl.load(grad_scale_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        mask = offs < end
        # 16-bit loads widen to fp64 via fp32
        w = tl.load(om + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        theta = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        star = tl.load(ts + offs, mask=mask, other=0.0).to(tl.float32)
        diff = theta.to(tl.float64) - star.to(tl.float64)
        if WITH_LOSS:
            acc += w * diff * diff
        if GRAD_MODE != 0:
            g = _ptr(addrs, n_tensors, 3, index, G_DTYPE)
            update = (w * diff * coef).to(tl.float32)
            if GRAD_MODE == 1:
                update += tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g + offs, _cast(update, G_DTYPE, INTERPRET), mask=mask)
    if WITH_LOSS:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _merge_kernel(addrs, numels, chunk_tensor, chunk_start, n_tensors, a, b,
                  S_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows: dst (fp32), src. dst ← a·dst + b·src."""
    index, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    dst = _ptr(addrs, n_tensors, 0, index, tl.float32)
    src = _ptr(addrs, n_tensors, 1, index, S_DTYPE)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        mask = offs < end
        value = a * tl.load(dst + offs, mask=mask) + b * tl.load(src + offs, mask=mask).to(tl.float32)
        tl.store(dst + offs, value, mask=mask)


@triton.jit
def _running_mean_kernel(addrs, numels, chunk_tensor, chunk_start, n_tensors, batch_count, total,
                         S_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows: mean, compensation (fp32), batch sum. Kahan-compensated mean ← mean + (S − n_b·mean)/N."""
    index, start, end = _chunk(numels, chunk_tensor, chunk_start, CHUNK)
    mean = _ptr(addrs, n_tensors, 0, index, tl.float32)
    compensation = _ptr(addrs, n_tensors, 1, index, tl.float32)
    sums = _ptr(addrs, n_tensors, 2, index, S_DTYPE)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        mask = offs < end
        m = tl.load(mean + offs, mask=mask)
        c = tl.load(compensation + offs, mask=mask)
        s = tl.load(sums + offs, mask=mask).to(tl.float32)
        y = (s - batch_count * m) / total - c
        t = m + y
        tl.store(compensation + offs, (t - m) - y, mask=mask)
        tl.store(mean + offs, t, mask=mask)


@dataclass
class _Launch:
    """One launch: the tensors of one dtype combination, as kernel table arguments."""

    dtypes: tuple[torch.dtype, ...]
    addrs: Tensor
    numels: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    n_tensors: int
    n_chunks: int

    def args(self) -> tuple:
        return self.addrs, self.numels, self.chunk_tensor, self.chunk_start, self.n_tensors


def _launches(groups: Sequence[Sequence[Tensor]]) -> list[_Launch]:
    """Address/size/chunk tables, one per dtype combination (rows = groups, e.g. θ, θ*, Ω)."""
    by_dtypes: dict[tuple, list[int]] = {}
    for i, t in enumerate(groups[0]):
        if t.numel():
            by_dtypes.setdefault(tuple(g[i].dtype for g in groups), []).append(i)
    launches = []
    for dtypes, members in by_dtypes.items():
        numels = [groups[0][i].numel() for i in members]
        chunk_tensor, chunk_start = [], []
        for j, n in enumerate(numels):
            starts = range(0, n, CHUNK)
            chunk_tensor += [j] * len(starts)
            chunk_start += starts
        addrs = [g[i].data_ptr() for g in groups for i in members]
        table = torch.tensor(addrs + numels + chunk_tensor + chunk_start, dtype=torch.int64,
                             device=groups[0][members[0]].device)
        n, c = len(members), len(chunk_tensor)
        a, b = len(addrs), len(addrs) + n
        launches.append(_Launch(dtypes, table[:a], table[a:b], table[b:b + c], table[b + c:], n, c))
    return launches


class _Contiguous:
    """Contiguous stand-ins for the tensors of `groups`; `finish()` copies mutated rows back."""

    def __init__(self, groups: Sequence[Sequence[Tensor]], mutated: Sequence[int] = ()):
        self.groups = [[t if t.is_contiguous() else t.contiguous() for t in g] for g in groups]
        self.writeback = [(orig, new) for r in mutated for orig, new in zip(groups[r], self.groups[r])
                          if new is not orig]

    def finish(self) -> None:
        for orig, new in self.writeback:
            orig.copy_(new)


def _penalty_launch(groups: Sequence[Sequence[Tensor]], lam: float, grad_mode: int, with_loss: bool,
                    grad_scale: Tensor | None = None) -> Tensor | None:
    launches = _launches(groups)
    device = groups[0][0].device
    partial = torch.empty(sum(l.n_chunks for l in launches), dtype=torch.float64, device=device)
    offset = 0
    for l in launches:
        g_dtype = _TL_DTYPE[l.dtypes[3]] if grad_mode else tl.float32
        _penalty_kernel[(l.n_chunks,)](
            *l.args(), partial[offset:], grad_scale if grad_scale is not None else partial,
            2.0 * lam, P_DTYPE=_TL_DTYPE[l.dtypes[0]], TS_DTYPE=_TL_DTYPE[l.dtypes[1]],
            OM_DTYPE=_TL_DTYPE[l.dtypes[2]], G_DTYPE=g_dtype, GRAD_MODE=grad_mode,
            WITH_LOSS=with_loss, INTERPRET=INTERPRET, CHUNK=CHUNK, BLOCK=CHUNK_BLOCK)
        offset += l.n_chunks
    if not with_loss:
        return None
    return (partial.sum() * lam).to(torch.float32)


def penalty(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
            lam: float) -> Tensor:
    """λ Σ Ω (θ − θ*)² as an fp32 scalar (terms and sums in fp64)."""
    work = _Contiguous([params, theta_star, omega])
    return _penalty_launch(work.groups, lam, grad_mode=0, with_loss=True)


def penalty_grad(params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
                 lam: float, grad_out: Tensor) -> list[Tensor]:
    """grad_out · 2λΩ(θ − θ*) per tensor, in the parameter's dtype (backward of `penalty`)."""
    work = _Contiguous([params, theta_star, omega])
    grads = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    _penalty_launch(work.groups + [grads], lam, grad_mode=2, with_loss=False,
                    grad_scale=grad_out.reshape(()))
    return grads


def penalty_and_grad_(params: Sequence[Tensor], grads: Sequence[Tensor], theta_star: Sequence[Tensor],
                      omega: Sequence[Tensor], lam: float) -> Tensor:
    """grads += 2λΩ(θ − θ*) in place; returns λ Σ Ω (θ − θ*)² (one pass over the four tensors)."""
    work = _Contiguous([params, theta_star, omega, grads], mutated=(3,))
    value = _penalty_launch(work.groups, lam, grad_mode=1, with_loss=True)
    work.finish()
    return value


def merge_(dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
    """dst ← a·dst + b·src per tensor."""
    work = _Contiguous([dst, src], mutated=(0,))
    for l in _launches(work.groups):
        _merge_kernel[(l.n_chunks,)](*l.args(), a, b, S_DTYPE=_TL_DTYPE[l.dtypes[1]], CHUNK=CHUNK,
                                     BLOCK=CHUNK_BLOCK)
    work.finish()


def running_mean_update_(means: Sequence[Tensor], compensations: Sequence[Tensor],
                         batch_sums: Sequence[Tensor], count: int, batch_count: int) -> None:
    """Kahan-compensated running means, as reference.running_mean_update_."""
    work = _Contiguous([means, compensations, batch_sums], mutated=(0, 1))
    for l in _launches(work.groups):
        _running_mean_kernel[(l.n_chunks,)](*l.args(), float(batch_count), float(count + batch_count),
                                            S_DTYPE=_TL_DTYPE[l.dtypes[2]], CHUNK=CHUNK,
                                            BLOCK=CHUNK_BLOCK)
    work.finish()
