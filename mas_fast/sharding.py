"""MAS on FSDP2 (`torch.distributed.fsdp.fully_shard`) models: what is sharded and how.

- Ω and θ* of a sharded parameter are DTensors with the parameter's own mesh and
  placements: a rank stores its shard only (~1/world of the state), the kernels work on the
  local shards (`local`), and `torch.distributed.checkpoint` saves and reloads them at any
  world size like the model's own parameters.
- An importance pass runs with the model unsharded (`unsharded`): every rule, the verification
  against autograd and the module-local paths see plain full parameters, exactly as on one
  process. The task's running sums are full-size on each rank until `consolidate()`, which
  all-reduces them (as for DDP) and keeps this rank's shard (`shard_like`).
- The penalty is local per shard plus one scalar all-reduce (`sum_over_ranks`), whose
  backward passes the gradient through unchanged: each rank's shard gets 2λΩ(θ−θ*) once.
- FSDP1 (`FullyShardedDataParallel`, flat parameters) and DTensors that FSDP2 does not manage
  (tensor parallel) are refused with a TypeError (`check_supported`).
"""
from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

Tensor = torch.Tensor


def _dtensor_type() -> type | None:
    # No DTensor can exist unless its module was imported: skip the (slow) import otherwise.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor (a parameter or state tensor of which a rank holds a shard)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that `fully_shard` wrapped (FSDP2's FSDPModule), outermost first."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    return [] if module_type is None else [m for m in model.modules() if isinstance(m, module_type)]


def check_supported(model: nn.Module) -> None:
    """TypeError for sharding MAS cannot follow: FSDP1 wrappers / flat parameters, and DTensor
    parameters outside any `fully_shard` module (tensor parallel)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if (fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules())) or \
            any(getattr(p, "_is_flat_param", False) for p in model.parameters()):
        raise TypeError("MAS does not support FullyShardedDataParallel (FSDP1) models: shard the model "
                        "with FSDP2, torch.distributed.fsdp.fully_shard, instead (see docs/sharded.md)")
    managed = {id(p) for m in fsdp2_modules(model) for p in m.parameters()}
    foreign = [n for n, p in model.named_parameters() if is_sharded(p) and id(p) not in managed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", … ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise TypeError(f"MAS supports DTensor parameters only under FSDP2 (fully_shard); these are not: "
                        f"{shown} (tensor parallel is not supported)")


def _settings(group) -> tuple:
    return group.post_forward_mesh_info, group.reshard_after_backward


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every `fully_shard` module of `model` unsharded (full parameters registered on the
    modules) and kept so through forwards and backwards; resharded, with FSDP's reshard
    settings restored, on exit. A no-op for a model without FSDP2 modules."""
    modules = fsdp2_modules(model)
    if not modules:
        yield
        return
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [_settings(g) for g in groups]
    auto = [m._get_fsdp_state()._auto_reshard_after_forward for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
            m.unshard()
        # The settings alone do not hold: a module called again inside its own forward (a layer
        # rule's forward hook) ends its inner call IDLE, and the outer post-forward then
        # reshards; the next use all-gathers again, a collective only ranks with more batches
        # run. So FSDP's own reshard is a no-op for the duration (an instance attribute).
        for g in groups:
            g.reshard = _keep_unsharded
        yield
    finally:
        for g, (post_forward, after_backward) in zip(groups, saved):
            vars(g).pop("reshard", None)
            g.post_forward_mesh_info, g.reshard_after_backward = post_forward, after_backward
        for m, was_auto in zip(modules, auto):
            m._get_fsdp_state()._auto_reshard_after_forward = was_auto
        # Not `m.reshard()`: a group whose last use was a forward (no backward after it) counts as
        # mid-forward, and the root, which never reshards after forward, would stay unsharded.
        for g in groups:
            g._to_sharded()


def _keep_unsharded() -> None:
    """FSDP2 `FSDPParamGroup.reshard` while `unsharded` holds the model: nothing."""


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """`full` (the same global shape on every rank) as a DTensor sharded like `param`; `full`
    itself when `param` is not sharded. Each rank slices its own shard: no communication."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage and autograd history), else `t`."""
    return t.to_local() if is_sharded(t) else t


def locals_of(tensors: Sequence[Tensor]) -> list[Tensor]:
    """`local` of each tensor."""
    return [local(t) for t in tensors]


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (gathered from every rank), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of a scalar whose backward passes the gradient through unchanged: each
    rank differentiates only its own shards' part, so every shard's gradient is counted once."""

    @staticmethod
    def forward(ctx, value: Tensor) -> Tensor:
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def sum_over_ranks(value: Tensor) -> Tensor:
    """Σ over ranks of a scalar (differentiable, see `_SumOverRanks`); `value` without a group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    return _SumOverRanks.apply(value)


def split_by_sharding(indices: Sequence[int], tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """`indices` split into those of sharded tensors and those of plain ones."""
    sharded = [i for i in indices if is_sharded(tensors[i])]
    return sharded, [i for i in indices if not is_sharded(tensors[i])]


def state_bytes(groups: Mapping[str, Mapping[str, Tensor]]) -> dict[str, int]:
    """Bytes this rank stores per group of tensors (local shards of DTensors)."""
    return {g: sum(local(t).numel() * local(t).element_size() for t in ts.values()) for g, ts in groups.items()}


def like(t: Tensor, param: Tensor) -> Tensor:
    """`t` (a whole tensor or a DTensor) with `param`'s sharding. Gathers `t` (a collective)
    only when it is a DTensor sharded otherwise."""
    if is_sharded(t) and is_sharded(param) and t.device_mesh == param.device_mesh \
            and t.placements == param.placements:
        return t
    return shard_like(full(t), param)


def on_local_shards(step: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`step` (an elementwise multi-tensor op) run on the local shards of the DTensors in its
    list arguments: a rank updates its own shards in place."""
    def local_lists(a: Any) -> Any:
        return locals_of(a) if isinstance(a, (list, tuple)) else a

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        return step(*map(local_lists, args), **{k: local_lists(v) for k, v in kwargs.items()})
    return run
