"""Σ_k |Σ_t δ_ktc · s_ktc| over (B, T, C): bias and norm-affine importance, one pass."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._runtime import SUM_BLOCK_C, SUM_BLOCK_T, split_count

Tensor = torch.Tensor


@triton.jit
def _per_sample_abs_sum_kernel(
    d_ptr, s_ptr, out_ptr, B, T, C, samples_per_prog,
    sdb, sdt, sdc, ssb, sst, ssc,
    HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[split, c] = Σ_{k in this program's samples} |Σ_t d[k, t, c] (· s[k, t, c])|."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_s = tl.program_id(1)
    mask_c = offs_c < C
    k_start = pid_s * samples_per_prog
    d_base = d_ptr + k_start.to(tl.int64) * sdb  # pointers walk in 64 bits
    s_base = s_ptr + k_start.to(tl.int64) * ssb
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for _ in range(k_start, tl.minimum(k_start + samples_per_prog, B)):
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < T)[:, None] & mask_c[None, :]
            v = tl.load(d_base + offs_t[:, None] * sdt + offs_c[None, :] * sdc, mask=mask, other=0.0)
            v = v.to(tl.float32)
            if HAS_SCALE:
                s = tl.load(s_base + offs_t[:, None] * sst + offs_c[None, :] * ssc, mask=mask, other=0.0)
                v = v * s.to(tl.float32)
            acc += tl.sum(v, axis=0)
        total += tl.abs(acc)
        d_base += sdb
        s_base += ssb
    tl.store(out_ptr + pid_s.to(tl.int64) * C + offs_c, total, mask=mask_c)


def per_sample_abs_sum(delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Σ_k |Σ_t δ_ktc s_ktc|, delta (and scale) (B, T, C) → fp32 (C,)."""
    B, T, C = delta.shape
    if B == 0 or T == 0 or C == 0:
        return torch.zeros(C, dtype=torch.float32, device=delta.device)
    block_c = min(SUM_BLOCK_C, triton.next_power_of_2(C))
    block_t = min(SUM_BLOCK_T, triton.next_power_of_2(T))
    tiles = triton.cdiv(C, block_c)
    per_prog = triton.cdiv(B, split_count(tiles, B, delta.device))
    split = triton.cdiv(B, per_prog)
    out = torch.empty(split, C, dtype=torch.float32, device=delta.device)
    s = delta if scale is None else scale  # a valid pointer either way; unread without a scale
    _per_sample_abs_sum_kernel[(tiles, split)](
        delta, s, out, B, T, C, per_prog, *delta.stride(), *s.stride(),
        HAS_SCALE=scale is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return out[0] if split == 1 else out.sum(0)
