"""Precision and memory policy shared by every backend and by the importance engine.

- `acc_dtype`: the dtype Ω, θ* and importance sums are kept in (float32, float64 for float64).
- `chunk_elements` / `samples_per_chunk`: the element budget that bounds per-sample temporaries;
  `samples_per_weight_chunk`: chunks of per-sample weight gradients, a few weights at a time.
"""
from __future__ import annotations

import os

import torch

# Upper bound on the elements of one chunk's per-sample temporary (c × P_layer).
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def chunk_elements() -> int:
    """Element budget of one per-sample chunk; MAS_FAST_CHUNK_ELEMENTS overrides it."""
    return int(os.environ.get("MAS_FAST_CHUNK_ELEMENTS", _DEFAULT_CHUNK_ELEMENTS))


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype Ω and θ* are kept in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def samples_per_chunk(elements_per_sample: int, batch: int) -> int:
    """How many samples fit in one chunk without exceeding `chunk_elements()`."""
    return max(1, min(batch, chunk_elements() // max(1, elements_per_sample)))


# Chunks of per-sample weight gradients: a temporary of WEIGHT_COPIES copies of the layer's
# weight, small next to the activations an ordinary backward holds, or of WEIGHT_CHUNK_FLOOR
# elements (1 MiB of fp32) for small layers, whose batched GEMMs are slow on fewer samples.
WEIGHT_COPIES = 4
WEIGHT_CHUNK_FLOOR = 1 << 18


def samples_per_weight_chunk(weight_elements: int, batch: int) -> int:
    """Samples per chunk of per-sample gradients of `weight_elements` each: WEIGHT_COPIES, or
    as many as fit in WEIGHT_CHUNK_FLOOR elements (fewer where `chunk_elements()` says so,
    at least one)."""
    samples = max(WEIGHT_COPIES, WEIGHT_CHUNK_FLOOR // max(1, weight_elements))
    return samples_per_chunk(weight_elements, min(batch, samples))
