"""Does a fast path describe what a layer computed? Compare Σ_k g_k with autograd.

A rule (or the module-local path) yields Σ_k |g_k|; its signed twin yields Σ_k g_k, the
batch gradient of the layer's own contribution to Σ_k ‖F(x_k)‖². Autograd's gradient of the
same objective, asked for in the same backward, is the truth: it sees every use of the
parameter (a weight also read outside its module, a hook that rescales the output, a
subclass with another forward). They must agree to round-off:

    max |Σ_k g_k − grad| <= rtol · max(max |grad|, max |Σ_k g_k|)

with rtol set by the lowest precision that took part (parameter, captured input or output
gradient, autocast): 1e-7 for float64, 1e-3 for float32, 2e-2 for float16, 5e-2 for bfloat16.
A genuine mismatch (a missed use, a factor) is of order one.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

Tensor = torch.Tensor

RTOL = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def tolerance(dtypes: Iterable[torch.dtype]) -> float:
    """The relative tolerance of the least precise of `dtypes` (float32's for unknown ones)."""
    return max((RTOL.get(d, RTOL[torch.float32]) for d in dtypes), default=RTOL[torch.float32])


def mismatch(signed: Optional[Tensor], grad: Optional[Tensor], rtol: float) -> Optional[str]:
    """Why Σ_k g_k (None: the path did not compute it) disagrees with autograd's gradient
    (None: the objective does not depend on the parameter), or None when they agree."""
    if grad is None:
        if signed is None or not bool(signed.any()):
            return None
        return "its layer reports a gradient where autograd finds none"
    if signed is None:
        if not bool(grad.any()):
            return None
        return "the layer's exact rule does not compute it"
    g = grad.to(signed.dtype)
    err = (signed - g).abs().max().item() if g.numel() else 0.0
    scale = max(g.abs().max().item(), signed.abs().max().item()) if g.numel() else 0.0
    if err <= rtol * scale or not math.isfinite(err):  # overflow is reported as NonFiniteError, not here
        return None
    return (f"its batch gradient from the captured input and output gradient differs from autograd's "
            f"(max error {err:.3g}, {err / scale:.3g} of the largest value; tolerance {rtol:g})")


__all__ = ["RTOL", "mismatch", "tolerance"]
