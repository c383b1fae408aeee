"""Forward hooks that capture each layer's input X, output Y and output-gradient Δ.

One forward and one backward of Σ_k ‖F(x_k)‖² give every layer's X and Δ; in eval
mode the samples are independent, so these are exactly the per-sample pieces the
rules need. Δ is requested for the output's autograd *edge* recorded in the forward
hook, not for the tensor: an in-place activation after the layer (ReLU(inplace=True))
rebinds the tensor's history, the edge still names the layer's own output.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .rules import Rule

Tensor = torch.Tensor


@dataclass
class Site:
    """A module with trainable direct parameters, and what one forward recorded of it."""

    module: nn.Module
    params: dict[str, str]            # attribute → canonical parameter name
    rule: Optional[Rule]              # None → generic fallback
    capture_grad: bool                # per_sample: record the output's gradient edge
    keep_calls: bool = False          # local fallback: keep (args, kwargs) of every call
    shared: bool = False              # a parameter also belongs to another module
    calls: int = 0
    x: Optional[Tensor] = None
    y: Optional[Tensor] = None
    edge: Optional[GradientEdge] = None
    call_args: list = field(default_factory=list)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls += 1
        if self.keep_calls:
            self.call_args.append((args, kwargs))
        if self.rule is None or self.calls > 1 or not args or not isinstance(output, Tensor):
            self.x = self.y = self.edge = None  # not a single plain call: the rule cannot describe it
            return
        self.x, self.y = args[0].detach(), output
        if self.capture_grad and output.requires_grad:
            self.edge = get_gradient_edge(output)

    @property
    def ruled(self) -> bool:
        """True when the exact rule applies: one plain call with a captured input."""
        return self.rule is not None and self.calls == 1 and self.x is not None

    def release(self) -> None:
        """Drop the captured tensors as soon as the rule has used them."""
        self.x = self.y = self.edge = None
        self.call_args.clear()


@contextmanager
def hooked(sites: list[Site]) -> Iterator[list[Site]]:
    """Install the capture hooks for the duration of one pass."""
    handles = [s.module.register_forward_hook(s.hook, with_kwargs=True) for s in sites]
    try:
        yield sites
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass (BatchNorm must not couple samples), each module's flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
