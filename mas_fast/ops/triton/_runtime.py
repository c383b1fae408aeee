"""Where the Triton kernels run and how they are tiled: GPU or interpreter, autotune configs.

Kernels are decorated (compiled or interpreted) when this package is imported, so the
interpreter choice is fixed then: TRITON_INTERPRET=1 must be set before the import.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

# The interpreter runs one program at a time in numpy: one small tile keeps CI fast.
# On GPU, a 64×64 output tile is the unit used to size the reduction split.
SPLIT_TILE = 32 if INTERPRET else 64
# Programs along the sample/row reduction are cut at multiples of the largest BLOCK_T.
REDUCTION_QUANTUM = 32 if INTERPRET else 64
# per_sample_abs_sum tiles: channels × positions per step (memory-bound, not autotuned).
SUM_BLOCK_C = 32 if INTERPRET else 256
SUM_BLOCK_T = 64 if INTERPRET else 32
# Multi-tensor ops: elements per program (apex-style chunks) and per inner step.
CHUNK = 256 if INTERPRET else 65536
CHUNK_BLOCK = 128 if INTERPRET else 1024


def _config(o: int, i: int, t: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t}, num_warps=warps, num_stages=stages)


def gemm_configs(abs_at_load: bool) -> list[triton.Config]:
    """Autotune candidates for Ampere (A100: 164 KB smem) and Hopper (H100: 228 KB).

    Configs that exceed a GPU's shared memory fail to compile and are skipped by the
    autotuner. The per-sample kernel holds two fp32 tiles (sample and total), so its
    tiles stay at most 128×128; the plain abs-GEMM also tries 128×256 (Hopper).
    """
    if INTERPRET:
        return [_config(32, 32, 32, 1, 1)]
    configs = [
        _config(64, 64, 32, 4, 4), _config(64, 64, 64, 4, 3), _config(64, 128, 32, 4, 4),
        _config(128, 64, 32, 4, 4), _config(128, 128, 32, 8, 3), _config(128, 128, 64, 8, 3),
        _config(64, 64, 16, 4, 3), _config(32, 64, 16, 4, 3),
    ]
    if abs_at_load:
        configs += [_config(128, 256, 32, 8, 3), _config(256, 128, 32, 8, 3)]
    return configs


def prune_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Drop tiles far larger than the problem (a 10-wide head, T = 4 positions)."""
    def fits(c: triton.Config) -> bool:
        k = c.kwargs
        return (k["BLOCK_T"] <= max(16, triton.next_power_of_2(named_args["T"]))
                and k["BLOCK_O"] <= max(32, triton.next_power_of_2(named_args["O"]))
                and k["BLOCK_I"] <= max(32, triton.next_power_of_2(named_args["I"])))

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_T"])]


def dot_precision(device: torch.device) -> str:
    """How tl.dot multiplies fp32 × fp32 tiles, following torch's matmul setting.

    "highest" (torch's default) → 3xTF32, fp32-level error on tensor cores; "high" or
    "medium" → one TF32 pass, like cuBLAS with allow_tf32. Before Ampere (no TF32) and
    in the interpreter: plain fp32. bf16/fp16 tiles are exact products with fp32
    accumulation either way.
    """
    if INTERPRET or capability(device) < (8, 0):
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_PROPERTIES: dict[int, tuple[tuple[int, int], int]] = {}


def _properties(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of a CUDA device, cached."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROPERTIES:
        props = torch.cuda.get_device_properties(index)
        _PROPERTIES[index] = (props.major, props.minor), props.multi_processor_count
    return _PROPERTIES[index]


def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of `device`."""
    return _properties(device)[0]


def _target_programs(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4  # small, so that tests exercise both split and unsplit reductions
    return 2 * _properties(device)[1]


def split_count(tiles: int, units: int, device: torch.device) -> int:
    """Programs along a reduction of `units` items so that `tiles` output tiles fill ~2 waves.

    Each program writes its own partial tile and torch sums them: deterministic, and the
    buffer is at most ~(target programs × tile) since splitting only happens for few tiles.
    """
    return max(1, min(units, triton.cdiv(_target_programs(device), max(1, tiles))))
