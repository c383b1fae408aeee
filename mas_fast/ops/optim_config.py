"""Hyper-parameters of the fused optimizer steps, declared once for every backend.

Each is torch.optim's set for one param group (minus implementation switches), plus how the MAS
penalty enters the step (`penalty_step`); the MAS part of a step (λ, θ*, Ω) travels beside it.
Frozen, so one object can be shared by every call of a step.

`penalty_step`:
- "gradient" (default): the step on g + 2λΩ(θ−θ*), i.e. torch.optim on `loss + mas.penalty()`;
- "proximal": the step on the loss gradient g alone gives θ', then the penalty's proximal map
  θ ← θ* + (θ' − θ*) / (1 + 2·lr·λΩ), the exact minimiser of λΩ(θ−θ*)² + (θ−θ')²/(2·lr).
  Stable for any λΩ (a contraction towards θ*); optimizer state (SGD's momentum buffer, Adam's
  moments) sees the loss gradient only.
"""
from __future__ import annotations

from dataclasses import dataclass

PENALTY_STEPS = ("gradient", "proximal")


def check_penalty_step(value: object) -> None:
    """ValueError unless `value` is one of PENALTY_STEPS."""
    if value not in PENALTY_STEPS:
        raise ValueError(f"penalty_step must be one of {PENALTY_STEPS}, got {value!r}")


class _PenaltyStep:
    """What both configs share: the checked `penalty_step` field."""

    penalty_step: str

    def __post_init__(self) -> None:
        check_penalty_step(self.penalty_step)

    @property
    def proximal(self) -> bool:
        """True when the penalty is applied by its proximal map (see the module docstring)."""
        return self.penalty_step == "proximal"


@dataclass(frozen=True)
class SGDConfig(_PenaltyStep):
    """torch.optim.SGD: θ ← θ − lr·d, d the (momentum, nesterov) direction of g (+ weight decay)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    penalty_step: str = "gradient"


@dataclass(frozen=True)
class AdamConfig(_PenaltyStep):
    """torch.optim.Adam; AdamW with `decoupled_weight_decay=True`."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False
    penalty_step: str = "gradient"


__all__ = ["SGDConfig", "AdamConfig", "PENALTY_STEPS", "check_penalty_step"]
