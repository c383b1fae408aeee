"""MAS on FSDP2 (`torch.distributed.fsdp.fully_shard`) models: what is sharded and how.

- Ω and θ* of a sharded parameter are DTensors with the parameter's own mesh and
  placements: a rank stores its shard only (~1/world of the state), the kernels work on the
  local shards (`local`), and `torch.distributed.checkpoint` saves and reloads them at any
  world size like the model's own parameters.
- An importance pass lets FSDP gather one group at a time through its own hooks; the capture
  records the gathered parameters the forward used (importance.capture.parameters_in_use). A
  module-local path gathers only its module's parameters (`whole_parameters`) and calls a
  `fully_shard` module without FSDP's hooks (`functional_call`); the whole-model fallback
  gathers the whole model for its moment (`model_unsharded`).
- Each batch's whole-size sums are reduce-scattered over the ranks (`reduced_to_shards`), so
  the running task holds shards; the ranks run the pass in step (`exchange`, `broadcast_input`).
- The penalty is local per shard plus one scalar all-reduce (`sum_over_ranks`), whose
  backward passes the gradient through unchanged: each rank's shard gets 2λΩ(θ−θ*) once.
- FSDP1 (`FullyShardedDataParallel`, flat parameters) and DTensors that FSDP2 does not manage
  (tensor parallel) are refused with a TypeError (`check_supported`).
"""
from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

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
    return [m for m in model.modules() if is_fsdp_module(m)]


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


def is_fsdp_module(module: nn.Module) -> bool:
    """True for a module that `fully_shard` wrapped (FSDP2's FSDPModule)."""
    module_type = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return module_type is not None and isinstance(module, module_type)


def reshard(model: nn.Module) -> None:
    """Every `fully_shard` module of `model` resharded (FSDP keeps the root unsharded after a
    forward that no backward follows, as in `mode="local"`)."""
    for m in fsdp2_modules(model):
        m.reshard()


class _WithoutHooks(nn.Module):
    """Calls `inner.forward` itself: none of `inner`'s own hooks (FSDP2's) run."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)


def whole_parameters(module: nn.Module, given: Mapping[str, Tensor], dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """The parameters of `module` (attribute paths) that FSDP2 holds sharded and `given` does not
    name, each whole (`full`: a collective each, in the module's order) in `dtype` (FSDP's
    param_dtype, as the forward ran; None: their own). Gather them before a torch.func transform
    that calls the module, not inside it (one collective per sample chunk would desynchronise ranks)."""
    return {n: full(p).to(dtype or p.dtype) for n, p in module.named_parameters() if is_sharded(p) and n not in given}


def functional_call(module: nn.Module, params: Mapping[str, Tensor], args: Any, kwargs: Any) -> Any:
    """`torch.func.functional_call(module, params, args, kwargs)`; a `fully_shard` module runs
    without its own hooks, FSDP's, which would all-gather or free its parameters inside a
    torch.func transform (`params` must then hold every sharded parameter: `whole_parameters`)."""
    if not is_fsdp_module(module):
        return torch.func.functional_call(module, dict(params), args, kwargs)
    return torch.func.functional_call(_WithoutHooks(module), {f"inner.{n}": t for n, t in params.items()},
                                      args, kwargs)


def _reshard_settings(module: nn.Module) -> Optional[tuple[bool, bool]]:
    """(reshard after forward, reshard after backward) of a `fully_shard` module (None without
    parameters): FSDP has setters for them but no getters, so they are read from its group."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    return (groups[0].post_forward_mesh_info is not None, groups[0].reshard_after_backward) if groups else None


@contextmanager
def model_unsharded(model: nn.Module) -> Iterator[None]:
    """Every `fully_shard` module of `model` gathered, and kept so through the forwards and
    backwards run meanwhile (FSDP's own hooks run inside them); resharded, FSDP's reshard settings
    restored, on exit. Only for the whole-model torch.func fallback, which differentiates the
    whole model per sample. A no-op for a model without FSDP2 modules."""
    modules = fsdp2_modules(model)
    saved = [_reshard_settings(m) for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
            m.unshard()
        yield
    finally:
        for m, settings in zip(modules, saved):
            if settings is not None:
                m.set_reshard_after_forward(settings[0], recurse=False)
                m.set_reshard_after_backward(settings[1], recurse=False)
            m.reshard()


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


# At most this many elements (whole-size, padded) go into one reduce-scatter or all-reduce of
# importance sums: few collectives per batch, and a send buffer of bounded size (64 MiB of float32).
BUCKET_ELEMENTS = 1 << 24


def _scatterable(p: Tensor) -> bool:
    """True for FSDP2's own layout: a DTensor sharded on dimension 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    return is_sharded(p) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),) and p.dim() > 0


def _rows_per_rank(p: Tensor) -> int:
    """Rows of dimension 0 in each rank's padded shard (torch.chunk's split, as FSDP2's)."""
    return -(-p.shape[0] // p.device_mesh.size())


def _elements_per_rank(p: Tensor) -> int:
    """Elements in each rank's padded shard of `p`: its rows times the elements of one row."""
    return _rows_per_rank(p) * (p.numel() // max(p.shape[0], 1))


def _buckets(names: Sequence[str], sums: Mapping[str, Tensor], size: Callable[[str], int]) -> list[list[str]]:
    """`names` in consecutive runs of one dtype and device, each of at most BUCKET_ELEMENTS
    (by `size`) unless a single tensor is larger."""
    out: list[list[str]] = []
    total = 0
    for n in names:
        key = (sums[n].dtype, sums[n].device)
        if out and (sums[out[-1][0]].dtype, sums[out[-1][0]].device) == key and total + size(n) <= BUCKET_ELEMENTS:
            out[-1].append(n)
            total += size(n)
        else:
            out.append([n])
            total = size(n)
    return out


def _reduce_scatter(names: list[str], sums: dict[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Σ over ranks of `sums` of parameters sharded by FSDP2 on one mesh, this rank's rows of
    each as a DTensor like its parameter: one reduce-scatter of FSDP's padded layout. Each
    whole sum leaves `sums` once copied into the send buffer."""
    from torch.distributed.tensor import DTensor

    mesh = params[names[0]].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = {n: _elements_per_rank(params[n]) for n in names}
    first = sums[names[0]]
    send = torch.zeros(world, sum(per_rank.values()), dtype=first.dtype, device=first.device)
    offset = 0
    for n in names:
        flat = sums.pop(n).reshape(-1)
        for r in range(world):  # rank r's rows, then zeros up to the padded shard's size
            piece = flat[r * per_rank[n]:(r + 1) * per_rank[n]]
            send[r, offset:offset + piece.numel()] = piece
        offset += per_rank[n]
    received = torch.empty(send.shape[1], dtype=send.dtype, device=send.device)
    dist.reduce_scatter_single(received, send.view(-1), group=mesh.get_group())
    del send
    out, offset = {}, 0
    for n in names:
        p = params[n]
        rows = max(0, min(_rows_per_rank(p), p.shape[0] - rank * _rows_per_rank(p)))
        width = per_rank[n] // max(_rows_per_rank(p), 1)
        shard = received[offset:offset + rows * width].view(rows, *p.shape[1:])
        out[n] = DTensor.from_local(shard, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        offset += per_rank[n]
    return out


def reduced_to_shards(sums: dict[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Collective: Σ over ranks of every rank's whole-size `sums` (one per name of `params`, the
    same names on every rank), each kept as this rank's part: a DTensor sharded like its
    parameter, or the whole sum for a parameter that is not sharded. Empties `sums` as it goes
    (each whole sum is freed once sent).

    Parameters in FSDP2's layout go through reduce-scatters (as FSDP reduces gradients), in
    buckets of at most BUCKET_ELEMENTS; the others (replicated parameters, other placements)
    through all-reduces of flat buffers, then each rank keeps its part."""
    names = sorted(params)
    scatter = [n for n in names if _scatterable(params[n])]
    shapes = {n: sums[n].shape for n in names}
    out: dict[str, Tensor] = {}
    for bucket in _buckets(scatter, sums, lambda n: _elements_per_rank(params[n]) * params[n].device_mesh.size()):
        out.update(_reduce_scatter(bucket, sums, params))
    rest = [n for n in names if n not in out]
    for bucket in _buckets(rest, sums, lambda n: sums[n].numel()):
        flat = torch.cat([sums.pop(n).reshape(-1) for n in bucket])
        dist.all_reduce(flat)
        for n, piece in zip(bucket, flat.split([shapes[n].numel() for n in bucket])):
            out[n] = shard_like(piece.view(shapes[n]), params[n])
    return out


def exchange(code: int, value: int = 0) -> list[tuple[int, int]]:
    """Collective: every rank's (code, value) pair, by rank."""
    from .distributed import exchange_device

    mine = torch.tensor([code, value], dtype=torch.int64, device=exchange_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [(int(t[0]), int(t[1])) for t in gathered]


def broadcast_input(x: Any, src: int, device: torch.device) -> Any:
    """Collective: rank `src`'s `x` (a batch: tensors in any structure) on every rank, on `device`."""
    from torch.utils._pytree import tree_map

    box = [tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, x) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, box[0])


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
