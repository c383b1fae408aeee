"""Forward hooks that capture each layer's input X, output Y and output-gradient Δ.

One forward and one backward of Σ_k ‖F(x_k)‖² give every layer's X and Δ; in eval
mode the samples are independent, so these are exactly the per-sample pieces the
rules need. Δ is streamed: the hook threads the layer's output through `_Tap`, an
in-place identity whose backward hands Δ to the site the moment it arrives, so the rule
runs and Δ is dropped before the next layer's gradient exists (peak memory of an
ordinary backward, not one Δ per layer). Because the tap rewrites the output's own
history, an in-place activation after the layer (ReLU(inplace=True)) still lets the
tap see the layer's output gradient. Every tap also takes a dummy leaf, the `anchor`:
asking autograd for the anchor's gradient makes it run exactly the nodes between the
objective and the taps (input gradients only, no weight gradients).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from .rules import Rule

Tensor = torch.Tensor


class _Tap(torch.autograd.Function):
    """Identity on a layer's output (marked in place) whose backward delivers Δ to its site."""

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor, site: "Site") -> Tensor:
        ctx.mark_dirty(y)
        ctx.site = site
        return y

    @staticmethod
    def backward(ctx, delta: Tensor):
        ctx.site.deliver(delta)
        return delta, None, None


@dataclass
class Site:
    """A module with trainable direct parameters, and what one forward recorded of it."""

    module: nn.Module
    params: dict[str, str]            # attribute → canonical parameter name
    rule: Optional[Rule]              # None → generic fallback
    keep_calls: bool = False          # local fallback: keep (args, kwargs) of every call
    shared: bool = False              # a parameter also belongs to another module
    calls: int = 0
    x: Optional[Tensor] = None
    y: Optional[Tensor] = None
    call_args: list = field(default_factory=list)
    # per_sample capture: Δ goes to on_delta(site, Δ) during the backward of the anchor
    anchor: Optional[Tensor] = None
    on_delta: Optional[Callable[["Site", Tensor], None]] = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self.calls += 1
        if self.keep_calls:
            self.call_args.append((args, kwargs))
        if self.rule is None or self.calls > 1 or not args or not isinstance(output, Tensor):
            self.x = self.y = None  # not a single plain call: the rule cannot describe it
            return None
        self.x, self.y = args[0].detach(), output
        if self.anchor is None or not output.requires_grad:
            return None
        return _Tap.apply(output, self.anchor, self)

    def deliver(self, delta: Tensor) -> None:
        """Δ of this layer's output (backward of the tap): run the callback, then forget X."""
        if self.ruled:  # a second call makes the site fallback-only; its taps stay silent
            with without_autocast(delta.device):
                self.on_delta(self, delta)
        self.release()

    @property
    def ruled(self) -> bool:
        """True when the exact rule applies: one plain call with a captured input."""
        return self.rule is not None and self.calls == 1 and self.x is not None

    def release(self) -> None:
        """Drop the captured tensors as soon as the rule has used them."""
        self.x = self.y = None
        self.call_args.clear()


def stream_deltas(sites: list[Site], objective: Callable[[], Tensor],
                  on_delta: Callable[[Site, Tensor], None], params: dict[str, Tensor]) -> set[str]:
    """Run `objective()` (a forward ending in a scalar) and stream every ruled site's Δ.

    `on_delta(site, Δ)` is called once per ruled site whose output reaches the objective,
    during the backward. Returns the names of the parameters (from `params`) of the
    sites no rule covers that the objective depends on: those need the generic fallback,
    the others have zero gradient.
    """
    anchor = torch.zeros((), requires_grad=True)
    for s in sites:
        s.anchor, s.on_delta = anchor, on_delta
    try:
        with hooked(sites), torch.enable_grad():
            total = objective()
        candidates = {n: params[n] for s in sites if not s.ruled for n in s.params.values()}
        if not total.requires_grad:
            return set()
        grads = torch.autograd.grad(total, [anchor, *candidates.values()], allow_unused=True)
        return {n for n, g in zip(candidates, grads[1:]) if g is not None}
    finally:
        for s in sites:
            s.anchor = s.on_delta = None
            s.release()


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


def without_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast off on `device` while rules run: an ambient torch.autocast would run their
    GEMMs in bf16/fp16 and return low-precision Ω pieces (the forward keeps the user's autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
