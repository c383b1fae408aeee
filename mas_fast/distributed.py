"""torch.distributed support for MAS.

- Data parallel (DDP, or any setup where every rank holds the full parameters): each rank
  accumulates importance on its own shard of the data; at `consolidate()` the per-task
  sums and sample counts are all-reduced, so every rank holds the Ω a single process
  would compute on the union of the data (up to float summation order).
- Sharded parameters (FSDP, FSDP2 `fully_shard`, tensor parallel DTensors) are refused
  with a TypeError: a rank holds only a slice of each parameter, while per-sample
  importance needs every layer's full weight and activations.
"""
from __future__ import annotations

import sys
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from .ops.policy import acc_dtype

Tensor = torch.Tensor


def active() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that are shards: DTensors (FSDP2, tensor parallel), FSDP1
    flat parameters, or anything inside a FullyShardedDataParallel wrapper."""
    # No DTensor can exist unless its module was imported: skip the (slow) import otherwise.
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    inside_fsdp = fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())
    return [n for n, p in model.named_parameters()
            if inside_fsdp or getattr(p, "_is_flat_param", False)
            or (dtensor is not None and isinstance(p, dtensor))]


def check_unsharded(model: nn.Module) -> None:
    """TypeError naming the sharded parameters, if any (see the module docstring)."""
    names = sharded_parameters(model)
    if names:
        shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
        raise TypeError(
            f"MAS does not support sharded parameters (FSDP / fully_shard / DTensor): {shown}. "
            "Per-sample importance needs each layer's full weight; use DistributedDataParallel "
            "(or no wrapper) for the importance pass and the penalty")


def union_mean(means: Mapping[str, Tensor], comps: Mapping[str, Tensor], count: int,
               params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Collective: the running mean over every rank's samples, and the total sample count.

    `means`/`comps` are this rank's Kahan running mean and compensation over `count`
    samples; a rank that saw no samples (count 0) contributes zeros for `params`. Every
    rank must call this with the same parameter names and shapes (a ValueError on all
    ranks otherwise).
    """
    names = sorted(means) if count else sorted(params)  # the same order on every rank
    like = means if count else params
    device = like[names[0]].device if names else torch.device("cpu")
    numel = sum(like[n].numel() for n in names)
    layout = torch.tensor([numel, -numel], dtype=torch.int64, device=device)
    dist.all_reduce(layout, op=dist.ReduceOp.MAX)
    if layout[0].item() != -layout[1].item():
        raise ValueError(f"ranks hold importance for different parameters (this rank: {numel} "
                         f"elements, others between {-layout[1].item()} and {layout[0].item()}); "
                         "every rank must consolidate the same model")
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    n_total = int(total.item())
    # Σ over this rank's samples: the Kahan estimate of the mean is mean − comp.
    sums = {n: (means[n] - comps[n]) * count if count else
            torch.zeros(params[n].shape, dtype=acc_dtype(params[n].dtype), device=device) for n in names}
    for dtype in {t.dtype for t in sums.values()}:  # one all-reduce per dtype
        group = [n for n in names if sums[n].dtype == dtype]
        flat = torch.cat([sums[n].reshape(-1) for n in group])
        dist.all_reduce(flat)
        for n, piece in zip(group, flat.split([sums[n].numel() for n in group])):
            sums[n] = piece.view(sums[n].shape) / max(n_total, 1)
    order = [n for n in params if n in sums] + [n for n in names if n not in params]  # model order
    return {n: sums[n] for n in order}, n_total
