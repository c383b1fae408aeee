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
objective and the taps (input gradients only, no weight gradients). Verification asks for
the parameters' gradients in the same backward.

A module-local site (a module without a rule, or one demoted from its rule) records every
call's inputs and taps every tensor of its output: its Δs are kept until the backward ends,
when the module's own per-sample vector-Jacobian product turns them into Σ_k |g_k|.
"""
from __future__ import annotations

import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .rules import Rule
from .. import sharding

Tensor = torch.Tensor


class _Tap(torch.autograd.Function):
    """Identity on a layer's output tensors (marked in place) whose backward hands their
    gradients to `receive` (None for an output the objective does not use)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, receive: Callable[[tuple], None], *outputs: Tensor):
        ctx.mark_dirty(*outputs)
        ctx.set_materialize_grads(False)
        ctx.receive = receive
        return outputs

    @staticmethod
    def backward(ctx, *deltas: Optional[Tensor]):
        ctx.receive(deltas)
        return (None, None, *deltas)


def _covers_its_base(t: Tensor) -> bool:
    """True when the view `t` is its whole (contiguous, non-leaf) base reshaped, as a Linear on
    (B, T, in) returns its (B·T, out) product."""
    b = t._base
    return (b.grad_fn is not None and b.is_contiguous() and t.is_contiguous() and t.numel() == b.numel()
            and t.dtype == b.dtype and t.storage_offset() == b.storage_offset())


def _tap_target(t: Tensor, alias_views: bool, bases: set[int]) -> tuple[Tensor, bool]:
    """(the tensor to modify in place, whether it is the base of the view `t`).

    `t` itself when it is not a view. A view's history goes through its base (an in-place
    identity on the view becomes CopySlices, which loses the tap's edge to the anchor), so with
    `alias_views` the tap goes on the base when the view is the base reshaped, and the layer's
    output becomes the same reshape of the tapped base: no copy exists. Otherwise a copy, as
    for a leaf (a module returning its parameter), which cannot be modified in place. Aliasing
    is for layers whose output's base no op saves for its backward: the single-output ruled
    layers, whose known forward ends in a GEMM and a reshape. A saved base (attention's
    weights, saved by its softmax) would be invalidated by the in-place tap.
    """
    if t.grad_fn is not None and not t._is_view():
        return t, False
    if t._is_view() and alias_views and _covers_its_base(t) and id(t._base) not in bases:
        bases.add(id(t._base))
        return t._base, True
    return t.clone(), False


def _tapped(anchor: Tensor, receive: Callable[[tuple], None], outputs: list, alias_views: bool = False) -> list:
    """`outputs` with every tensor that requires grad threaded through one tap (see _tap_target)."""
    where = [i for i, t in enumerate(outputs) if isinstance(t, Tensor) and t.requires_grad]
    if not where:
        return outputs
    bases: set[int] = set()
    targets = [_tap_target(outputs[i], alias_views, bases) for i in where]
    shapes = [outputs[i].shape if aliased else None for i, (_, aliased) in zip(where, targets)]

    def deliver(deltas: tuple) -> None:  # a tapped base's gradient, shaped as the layer's output
        receive(where, tuple(d if shape is None or d is None else d.reshape(shape)
                             for d, shape in zip(deltas, shapes)))

    new = list(outputs)
    for i, t, shape in zip(where, _Tap.apply(anchor, deliver, *[t for t, _ in targets]), shapes):
        new[i] = t if shape is None else t.view(shape)
    return new


def detached(tree: Any) -> Any:
    """`tree` with every tensor leaf detached from the graph."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


_paused = threading.local()


@contextmanager
def _hooks_paused() -> Iterator[None]:
    """Capture hooks ignore the calls made meanwhile (by a rule running inside a hook)."""
    before, _paused.active = getattr(_paused, "active", False), True
    try:
        yield
    finally:
        _paused.active = before


@dataclass(eq=False)  # identity: sites hold tensors
class Site:
    """A module with trainable direct parameters, and what one forward recorded of it."""

    module: nn.Module
    params: dict[str, str]            # attribute (path) → canonical parameter name
    rule: Optional[Rule]              # None → module-local path (`local`) or whole-model fallback
    batch: int = 0                    # samples in the pass: the size of the layer's sample dim
    keep_calls: bool = False          # local fallback: keep (args, kwargs) of every call
    shared: bool = False              # a parameter also belongs to another module
    path: str = ""                    # the module's name in the model
    local: bool = False               # module-local capture: every call's inputs and output Δs
    calls: int = 0
    bdim: int = 0                     # the dimension of the layer's input that indexes samples
    unmatched: Optional[tuple] = None  # input shape without a unique sample dimension
    ambiguous: bool = False           # ...because several dimensions have the batch's size
    x: Any = None                     # the input, samples first (the whole call for `needs_call` rules)
    y: Any = None                     # the output (a tuple for `needs_call` rules)
    call_args: list = field(default_factory=list)
    # module-local capture: per call [(args, kwargs), Δ per output leaf]; output shapes whose
    # dimension 0 is not the batch (the per-sample VJP cannot split them)
    local_calls: list = field(default_factory=list)
    unbatched: Optional[tuple] = None
    # per_sample capture: an output whose sample dimension has size 1 (position ids of shape
    # (1, T)) may be expanded to the batch, so that each sample gets its own Δ
    may_expand: bool = False
    expanded: bool = False
    # per_sample capture: Δ goes to on_delta(site, Δ) during the backward of the anchor
    anchor: Optional[Tensor] = None
    on_delta: Optional[Callable[["Site", Any], None]] = None
    # local capture: on_output(site) runs in the forward hook, while X and Y are as the layer
    # produced them (a later in-place op, ReLU(inplace=True) or `out += identity`, rewrites Y)
    on_output: Optional[Callable[["Site"], None]] = None

    @property
    def needs_call(self) -> bool:
        return getattr(self.rule, "needs_call", False)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if getattr(_paused, "active", False):
            return None
        self.calls += 1
        if self.local:
            return self._local_hook(args, kwargs, output)
        if self.keep_calls:
            self.call_args.append((args, kwargs))
        outputs = output if self.needs_call and isinstance(output, tuple) else (output,)
        if self.rule is None or self.calls > 1 or not args or not isinstance(outputs[0], Tensor):
            self.x = self.y = None  # not a single plain call: the rule cannot describe it
            return None
        first = args[0]
        dims = [d for d in self.rule.sample_dims(module, first) if first.shape[d] == self.batch]
        size_one = not self.needs_call and self.batch > 1 and 0 in self.rule.sample_dims(module, first) and \
            all(t.dim() > 0 and t.shape[0] == 1 for t in (first, outputs[0]))
        if size_one and dims:  # (1, T) with T == B: broadcast ids, or seq-first (T=1, B)? Unknown.
            dims.append(0)
        elif size_one and self._broadcast(first, outputs[0]):
            first, outputs = self._expand(first), (self._expand(outputs[0]),)
            output, dims = outputs[0], [0]
        if len(dims) > 1 and self.batch == 1:  # one sample: any dimension of size 1 indexes it exactly
            dims = dims[:1]
        if len(dims) != 1:  # which dimension holds the samples is unknown: fallback
            self.x = self.y = None
            self.unmatched, self.ambiguous = tuple(first.shape), len(dims) > 1
            return None
        self.bdim = dims[0]
        self.x = detached((args, kwargs)) if self.needs_call else self.samples_first(first.detach())
        self.y = output
        if self.on_output is not None:
            with _hooks_paused():  # the rule may call the module again (attention's per-sample VJP)
                self.on_output(self)
        if self.anchor is None:
            return None
        new = _tapped(self.anchor, lambda _, deltas: self.deliver(deltas), list(outputs),
                      alias_views=not self.needs_call)
        if not self.needs_call:
            self.y = None  # only attention's Δs are aligned with its outputs: a kept Y would pin its base
        return tuple(new) if self.needs_call and isinstance(output, tuple) else new[0]

    def _broadcast(self, *tensors: Tensor) -> bool:
        """True when the tensors have size 1 where the batch's samples would be (dimension 0)
        and expanding them is allowed: the output is then only broadcast against batched tensors."""
        return self.may_expand and self.anchor is not None and self.batch > 1 and \
            all(t.dim() > 0 and t.shape[0] == 1 for t in tensors)

    def _expand(self, t: Tensor) -> Tensor:
        self.expanded = True
        return t.expand(self.batch, *t.shape[1:])

    def _local_hook(self, args: tuple, kwargs: dict, output: Any) -> Any:
        leaves, spec = tree_flatten(output)
        grads = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
        if grads and all(t.dim() > 0 and t.shape[0] != self.batch for t in grads) and self._broadcast(*grads):
            leaves = [self._expand(t) if isinstance(t, Tensor) and t.requires_grad else t for t in leaves]
        unbatched = [tuple(t.shape) for t in leaves if isinstance(t, Tensor) and t.requires_grad
                     and (t.dim() == 0 or t.shape[0] != self.batch)]
        if unbatched:
            self.unbatched = tuple(unbatched)
        if self.anchor is None or self.unbatched is not None:
            return None
        record = (detached((args, kwargs)), [None] * len(leaves))
        self.local_calls.append(record)

        def receive(where: list, deltas: tuple) -> None:
            for i, d in zip(where, deltas):
                record[1][i] = d

        return tree_unflatten(_tapped(self.anchor, receive, leaves), spec)

    def deliver(self, deltas: tuple) -> None:
        """Δ of this layer's outputs (backward of the tap): run the callback, then forget X."""
        if self.ruled and any(d is not None for d in deltas):  # a second call: taps stay silent
            device = next(d.device for d in deltas if d is not None)
            if not self.needs_call:
                deltas = self.samples_first(deltas[0])
            elif isinstance(self.y, tuple):  # align with the outputs, untapped ones None
                it = iter(deltas)
                deltas = tuple(next(it) if isinstance(t, Tensor) and t.requires_grad else None for t in self.y)
            with without_autocast(device):
                self.on_delta(self, deltas)
        self.release()

    def samples_first(self, t: Tensor) -> Tensor:
        """`t` (the layer's input, output or Δ) with the sample dimension moved to the front."""
        return t.movedim(self.bdim, 0) if self.bdim and not self.needs_call else t

    @property
    def ruled(self) -> bool:
        """True when the exact rule applies: one plain call with a captured input."""
        return self.rule is not None and self.calls == 1 and self.x is not None

    def release(self) -> None:
        """Drop the captured tensors as soon as the rule has used them."""
        self.x = self.y = None
        self.call_args.clear()
        self.local_calls.clear()


def run_and_stream(sites: list[Site], objective: Callable[[], Tensor],
                   on_delta: Callable[[Site, Any], None],
                   wanted: Callable[[Tensor], dict[str, Tensor]]) -> dict[str, Optional[Tensor]]:
    """Run `objective()` (a forward ending in a scalar), then one backward that streams every
    ruled site's Δ to `on_delta(site, Δ)` and returns autograd's gradients of the parameters
    `wanted(objective value)` names (asked after the forward; None where unused).

    Module-local sites keep their captures for the caller (who releases them); the others
    are released here.
    """
    anchor = torch.zeros((), requires_grad=True)
    for s in sites:
        s.anchor, s.on_delta = anchor, on_delta
    try:
        with hooked(sites), torch.enable_grad():
            total = objective()
        params = wanted(total)
        if not total.requires_grad:
            return {n: None for n in params}
        grads = torch.autograd.grad(total, [anchor, *params.values()], allow_unused=True)
        return dict(zip(params, grads[1:]))
    finally:
        for s in sites:
            s.anchor = s.on_delta = None
            if not s.local:
                s.release()


def stream_deltas(sites: list[Site], objective: Callable[[], Tensor],
                  on_delta: Callable[[Site, Tensor], None], params: dict[str, Tensor]) -> set[str]:
    """Run `objective()` (a forward ending in a scalar) and stream every ruled site's Δ.

    `on_delta(site, Δ)` is called once per ruled site whose output reaches the objective,
    during the backward. Returns the names of the parameters (from `params`) of the
    sites no rule covers that the objective depends on: those need the generic fallback,
    the others have zero gradient.
    """
    grads = run_and_stream(sites, objective, on_delta,
                           lambda _: {n: params[n] for s in sites if not s.ruled for n in s.params.values()})
    return {n for n, g in grads.items() if g is not None}


@contextmanager
def hooked(sites: list[Site]) -> Iterator[list[Site]]:
    """Install the capture hooks for the duration of one pass. On a `fully_shard` module the hook
    runs before FSDP2's post-forward: the parameters are still gathered, and FSDP's pre-backward
    hook, registered on the tapped output, gathers them again before the tap hands Δ to the rule."""
    handles = [s.module.register_forward_hook(s.hook, with_kwargs=True, prepend=sharding.is_fsdp_module(s.module))
               for s in sites]
    try:
        yield sites
    finally:
        for h in handles:
            h.remove()


@contextmanager
def parameters_in_use(model: nn.Module, params: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """`params` (canonical name → tensor), updated during the forwards run meanwhile with the tensor
    each module holds while it runs: under FSDP2 the gathered parameter that autograd
    differentiates (and its dtype, FSDP's param_dtype), not the shard. The same dict otherwise."""
    used = dict(params)
    if not any(sharding.is_sharded(p) for p in params.values()):
        yield used
        return
    name_of = {id(p): n for n, p in params.items()}
    held = {m: [(a, name_of[id(p)]) for a, p in m.named_parameters(recurse=False) if id(p) in name_of]
            for m in model.modules()}

    def record(module: nn.Module, args: tuple) -> None:  # after FSDP's pre-forward: gathered
        for attr, name in held[module]:
            used[name] = module.get_parameter(attr)

    handles = [m.register_forward_pre_hook(record) for m, own in held.items() if own]
    try:
        yield used
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
