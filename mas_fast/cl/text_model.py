"""A small byte-level GPT (pre-LayerNorm decoder) in plain PyTorch for the text scenario.

Built only from nn.Embedding, nn.LayerNorm and nn.Linear, so every parameter has an exact
mas_fast importance rule (no per-sample fallback), and no optional dependency is needed.
Positions are embedded from a (B, T) index so the position table is per sample too.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text_data import VOCAB

Tensor = torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("future", torch.ones(context, context).triu(1).bool(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        weights = scores.masked_fill(self.future[:T, :T], float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    """Bytes (B, T) int64 → next-byte logits (B, T, 256)."""

    def __init__(self, context: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads, context) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        B, T = ids.shape
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        where = torch.arange(T, device=ids.device).expand(B, T)
        return self.head(self.ln(self.blocks(self.tokens(ids) + self.positions(where))))


def next_byte_loss(logits: Tensor, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of predicting byte t+1 from bytes ≤ t; "per_sample": each sequence's mean."""
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    per_sample = per_token.view(ids.shape[0], -1).mean(1)
    return per_sample if reduction == "per_sample" else per_sample.sum() if reduction == "sum" else per_sample.mean()
