"""Hyper-parameters of the fused optimizer steps, declared once for every backend.

Each is torch.optim's set for one param group (minus implementation switches); the MAS part of a
step (λ, θ*, Ω) travels beside it. Frozen, so one object can be shared by every call of a step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SGDConfig:
    """torch.optim.SGD: θ ← θ − lr·d, d the (momentum, nesterov) direction of g (+ weight decay)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False


@dataclass(frozen=True)
class AdamConfig:
    """torch.optim.Adam; AdamW with `decoupled_weight_decay=True`."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False


__all__ = ["SGDConfig", "AdamConfig"]
