"""Importance GEMMs: Σ_n |δ_n||x_n|ᵀ and the per-sample Σ_k |Σ_t δ_kt x_ktᵀ| (Linear, conv).

Both keep the O×I output tile in registers and never build |Δ|, |X|, a product or a
per-sample gradient in memory: the abs-GEMM makes the operands absolute as it loads
them; the per-sample kernel reduces one sample's positions into a tile, takes |·| in
registers and adds it to a running total, sample after sample. Convolutions use the
same kernel with the im2col addressing computed on the fly (implicit GEMM).

When few output tiles exist, the reduction (rows or samples) is split over more
programs; each writes a partial tile and torch sums them (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._runtime import (INTERPRET, REDUCTION_QUANTUM, SPLIT_TILE, dot_precision, gemm_configs,
                       prune_configs, split_count)

Tensor = torch.Tensor
_GROUP = 8  # output-tile rows per L2 swizzle group


@triton.jit
def _tile(pid, O, I, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, GROUP: tl.constexpr):
    """(o, i) tile of program `pid`, grouped so that neighbours share operand rows in L2."""
    n_o = tl.cdiv(O, BLOCK_O)
    n_i = tl.cdiv(I, BLOCK_I)
    in_group = GROUP * n_i
    first_o = (pid // in_group) * GROUP
    size = tl.minimum(n_o - first_o, GROUP)
    pid_o = first_o + (pid % in_group) % size
    pid_i = (pid % in_group) // size
    return pid_o * BLOCK_O + tl.arange(0, BLOCK_O), pid_i * BLOCK_I + tl.arange(0, BLOCK_I)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; mixed dtypes (and the interpreter) compute in fp32."""
    if UPCAST or a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(configs=gemm_configs(abs_at_load=True), key=["O", "I", "T"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _abs_gemm_kernel(
    d_ptr, x_ptr, out_ptr, O, I, T, rows_per_prog,
    sdt, sdo, sxt, sxi, s_split,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[split] = Σ_{t in this program's rows} |d[t, o]| |x[t, i]| (T = rows)."""
    offs_o, offs_i = _tile(tl.program_id(0), O, I, BLOCK_O, BLOCK_I, GROUP)
    pid_s = tl.program_id(2)
    mask_o = offs_o < O
    mask_i = offs_i < I
    t_start = pid_s * rows_per_prog
    t_end = tl.minimum(t_start + rows_per_prog, T)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        d = tl.load(d_ptr + offs_o[:, None] * sdo + offs_t[None, :] * sdt,
                    mask=mask_o[:, None] & mask_t[None, :], other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * sxt + offs_i[None, :] * sxi,
                    mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 on raw bits: convert before any arithmetic
            d = d.to(tl.float32)
            x = x.to(tl.float32)
        acc = _dot(tl.abs(d), tl.abs(x), acc, UPCAST, PRECISION)
    out = out_ptr + pid_s.to(tl.int64) * s_split + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out, acc, mask=mask_o[:, None] & mask_i[None, :])


@triton.autotune(configs=gemm_configs(abs_at_load=False), key=["O", "I", "T", "IM2COL"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _per_sample_gemm_kernel(
    d_ptr, x_ptr, out_ptr, B, O, I, T, samples_per_prog,
    sdb, sdg, sdo, sdp, sdq, WO,
    sxb, sxg, sxc, sxh, sxw, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    s_split, s_group,
    IM2COL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[split, g] = Σ_{k in this program's samples} |Σ_t d[k, g, t, o] x[k, g, t, i]|.

    Positions t = p·WO + q. Without IM2COL, d and x are (B, G, T, ·) with position
    stride sdq / sxw and feature stride sdo / sxc. With IM2COL, d is the conv output
    gradient (B, C_out, H_o, W_o) and x the conv input (B, C_in, H, W); feature i of
    group g is (channel c, tap r, s) of the weight, read from x at
    (p·stride_h − pad_h + r·dil_h, q·stride_w − pad_w + s·dil_w), zero outside.
    """
    offs_o, offs_i = _tile(tl.program_id(0), O, I, BLOCK_O, BLOCK_I, GROUP)
    g = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    mask_o = offs_o < O
    mask_i = offs_i < I
    d_rows = offs_o * sdo
    if IM2COL:
        c = offs_i // (KH * KW)
        h_tap = ((offs_i // KW) % KH) * dil_h - pad_h
        w_tap = (offs_i % KW) * dil_w - pad_w
        x_cols = c * sxc
    else:
        x_cols = offs_i * sxc
    # One flat loop over (sample, position block) pairs, so that loads are pipelined across
    # samples too (T can be a single block); |·| of the sample's tile when its last block is in.
    k_start = pid_s * samples_per_prog
    n_blocks = tl.cdiv(T, BLOCK_T)
    steps = (tl.minimum(k_start + samples_per_prog, B) - k_start) * n_blocks
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for step in range(0, steps):
        k = k_start + step // n_blocks
        block = step % n_blocks
        d_base = d_ptr + k.to(tl.int64) * sdb + g * sdg
        x_base = x_ptr + k.to(tl.int64) * sxb + g * sxg
        offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        x_mask = mask_t[:, None] & mask_i[None, :]
        if IM2COL:
            p = offs_t // WO
            q = offs_t % WO
            d_off = d_rows[:, None] + (p * sdp + q * sdq)[None, :]
            h = (p * stride_h)[:, None] + h_tap[None, :]
            w = (q * stride_w)[:, None] + w_tap[None, :]
            x_mask = x_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x_off = h * sxh + w * sxw + x_cols[None, :]
        else:
            d_off = d_rows[:, None] + (offs_t * sdq)[None, :]
            x_off = (offs_t * sxw)[:, None] + x_cols[None, :]
        d = tl.load(d_base + d_off, mask=mask_o[:, None] & mask_t[None, :], other=0.0)
        x = tl.load(x_base + x_off, mask=x_mask, other=0.0)
        acc = _dot(d, x, acc, UPCAST, PRECISION)
        last = block == n_blocks - 1
        total += tl.where(last, tl.abs(acc), 0.0)
        acc = tl.where(last, 0.0, acc)
    out = out_ptr + pid_s.to(tl.int64) * s_split + g * s_group + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out, total, mask=mask_o[:, None] & mask_i[None, :])


def _tiles(G: int, O: int, I: int) -> int:
    return G * triton.cdiv(O, SPLIT_TILE) * triton.cdiv(I, SPLIT_TILE)


def abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_n |δ_n||x_n|ᵀ, delta (N, O), x (N, I) → fp32 (O, I); any strides, fp32/bf16/fp16."""
    N, O = delta.shape
    I = x.shape[1]
    if N == 0 or O == 0 or I == 0:
        return torch.zeros(O, I, dtype=torch.float32, device=delta.device)
    split = split_count(_tiles(1, O, I), triton.cdiv(N, REDUCTION_QUANTUM), delta.device)
    rows = triton.cdiv(triton.cdiv(N, split), REDUCTION_QUANTUM) * REDUCTION_QUANTUM
    split = triton.cdiv(N, rows)
    out = torch.empty(split, O, I, dtype=torch.float32, device=delta.device)

    def grid(meta):
        return triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]), 1, split

    _abs_gemm_kernel[grid](delta, x, out, O, I, N, rows, delta.stride(0), delta.stride(1),
                           x.stride(0), x.stride(1), O * I, UPCAST=INTERPRET,
                           PRECISION=dot_precision(delta.device), GROUP=_GROUP)
    return out[0] if split == 1 else out.sum(0)


def _per_sample(delta: Tensor, x: Tensor, B: int, G: int, O: int, I: int, T: int,
                d_strides: Sequence[int], x_strides: Sequence[int], conv: Sequence[int],
                im2col: bool) -> Tensor:
    """Launch the per-sample kernel; returns fp32 (G, O, I)."""
    if B == 0 or T == 0 or G * O * I == 0:
        return torch.zeros(G, O, I, dtype=torch.float32, device=delta.device)
    split = split_count(_tiles(G, O, I), B, delta.device)
    per_prog = triton.cdiv(B, split)
    split = triton.cdiv(B, per_prog)
    out = torch.empty(split, G, O, I, dtype=torch.float32, device=delta.device)

    def grid(meta):
        return triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]), G, split

    _per_sample_gemm_kernel[grid](delta, x, out, B, O, I, T, per_prog, *d_strides, *x_strides, *conv,
                                  G * O * I, O * I, IM2COL=im2col, UPCAST=INTERPRET,
                                  PRECISION=dot_precision(delta.device), GROUP=_GROUP)
    return out[0] if split == 1 else out.sum(0)


# Geometry arguments of a plain (B, G, T, ·) problem: H, W, KH, KW, stride, pad, dilation.
_NO_CONV = (1, 1, 1, 1, 1, 1, 0, 0, 1, 1)


def per_sample_abs_matmul(delta: Tensor, x: Tensor) -> Tensor:
    """Σ_k |Σ_t δ_kgt x_kgtᵀ|, delta (B, G, T, O), x (B, G, T, I) → fp32 (G, O, I)."""
    B, G, T, O = delta.shape
    I = x.shape[-1]
    sd, sx = delta.stride(), x.stride()
    d_strides = (sd[0], sd[1], sd[3], 0, sd[2], T)
    x_strides = (sx[0], sx[1], sx[3], 0, sx[2])
    return _per_sample(delta, x, B, G, O, I, T, d_strides, x_strides, _NO_CONV, im2col=False)


def conv_abs_grad(delta: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """Σ_k |per-sample conv2d weight gradient|, shaped like the weight (implicit GEMM)."""
    B, C_out, H_o, W_o = delta.shape
    _, C_in, H, W = x.shape
    kh, kw = weight_shape[-2:]
    G = groups
    O, c_in_g = C_out // G, C_in // G
    sd, sx = delta.stride(), x.stride()
    d_strides = (sd[0], O * sd[1], sd[1], sd[2], sd[3], W_o)
    x_strides = (sx[0], c_in_g * sx[1], sx[1], sx[2], sx[3])
    conv = (H, W, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    out = _per_sample(delta, x, B, G, O, c_in_g * kh * kw, H_o * W_o, d_strides, x_strides, conv,
                      im2col=True)
    return out.reshape(tuple(weight_shape))
