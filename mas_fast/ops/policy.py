"""Precision and memory policy shared by every backend and by the importance engine.

- `acc_dtype`: the dtype Ω, θ* and importance sums are kept in (float32, float64 for float64).
- `LEAN_OMEGA_DTYPE` / `state_dtypes_allowed`: the lean state (Ω in bfloat16, θ* in the
  parameter's dtype) every penalty and step kernel reads as it is, widening on load.
- `penalty_dtype`: the dtype every backend returns a penalty value in.
- `chunk_elements` / `samples_per_chunk`: the element budget that bounds per-sample temporaries;
  `samples_per_weight_chunk`: chunks of per-sample weight gradients, a few weights at a time.
"""
from __future__ import annotations

import os
from typing import Sequence

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


# Ω's dtype in the lean state (MAS(state_dtype=torch.bfloat16)); θ* then has the parameter's.
LEAN_OMEGA_DTYPE = torch.bfloat16


def state_dtypes_allowed(param_dtype: torch.dtype) -> tuple[tuple[torch.dtype, ...], tuple[torch.dtype, ...]]:
    """(θ* dtypes, Ω dtypes) the penalty and step ops take for a parameter of `param_dtype`: the
    accumulation dtype (the default state) or the lean one."""
    acc = acc_dtype(param_dtype)
    return tuple(dict.fromkeys((acc, param_dtype))), tuple(dict.fromkeys((acc, LEAN_OMEGA_DTYPE)))


def penalty_dtype(theta_star: Sequence[torch.Tensor], omega: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of a penalty value: float64 when θ*[0] or Ω[0] is, else float32 (also for the
    lean bfloat16 Ω)."""
    return acc_dtype(*(ts[0].dtype for ts in (theta_star, omega) if len(ts)))


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
