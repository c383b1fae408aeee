"""Real text that ships with every CPython, as byte-level windows for continual language modelling.

Domains (no download):
- "prose":  English prose, the help topics of `pydoc_data.topics` (CPython's docs text);
- "python": Python source, the standard library's top-level `.py` files.

A domain's bytes are cut into non-overlapping windows of `seq_len` bytes (token = byte,
vocabulary 256). Windows are split into train / validation / test with a fixed seed,
independent of the run seeds, so every run is evaluated on the same held-out text.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache

import torch

Tensor = torch.Tensor
VOCAB = 256          # bytes
SPLIT_SEED = 20180908
DOMAINS = ("prose", "python")
TEXT_SCENARIO = "text"
TEXT_TITLE = "Text, byte-level LM: English prose → Python source"
TITLES = {"prose": "English prose (pydoc_data.topics)", "python": "Python source (stdlib .py files)"}


@lru_cache(maxsize=None)
def domain_bytes(domain: str) -> bytes:
    """All the text of `domain`, in a fixed order."""
    if domain == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    if domain == "python":
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        if not files:
            raise ValueError("no standard-library .py files found next to this Python")
        parts = []
        for path in files:
            with open(path, "rb") as f:
                parts.append(f.read())
        return b"\n".join(parts)
    raise ValueError(f"unknown text domain {domain!r}; choose from {DOMAINS}")


@dataclass(frozen=True)
class TextSplits:
    """Windows (N, seq_len) int64 of one domain: train, validation (λ choice), test."""

    train: Tensor
    val: Tensor
    test: Tensor


def windows(data: bytes, seq_len: int) -> Tensor:
    """`data` cut into all whole non-overlapping windows of `seq_len` bytes, (N, seq_len) int64."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = len(data) // seq_len
    return torch.frombuffer(bytearray(data[:n * seq_len]), dtype=torch.uint8).view(n, seq_len).long()


def load_domain(domain: str, seq_len: int, train: int, val: int, test: int) -> TextSplits:
    """`train` / `val` / `test` disjoint windows of `domain`, drawn with the fixed split seed."""
    if min(train, val, test) < 1:
        raise ValueError(f"every split needs at least one window, got train={train}, val={val}, test={test}")
    all_windows = windows(domain_bytes(domain), seq_len)
    if train + val + test > len(all_windows):
        raise ValueError(f"{domain} holds {len(all_windows)} windows of {seq_len} bytes; "
                         f"{train + val + test} were asked for")
    order = torch.randperm(len(all_windows), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = all_windows[order]
    return TextSplits(train=held[:train], val=held[train:train + val], test=held[train + val:train + val + test])
