"""torch.distributed support for MAS.

- Data parallel (DDP, or any setup where every rank holds the full parameters): each rank
  accumulates importance on its own shard of the data; at `consolidate()` the per-task
  sums and sample counts are all-reduced, so every rank holds the Ω a single process
  would compute on the union of the data (up to float summation order).
- Before that reduction the ranks agree (see `union_mean`): every rank either commits, or
  raises the same clear error (differing parameters or configuration, or a rank whose
  importance pass failed), with no collective left pending and no state changed.
- FSDP2 (`fully_shard`) models reduce every batch during the pass instead (each rank keeps its
  shard of the running task, see mas_fast.sharding); `consolidate()` then only agrees (`agreed`).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from .ops.policy import acc_dtype

Tensor = torch.Tensor


def active() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankFailedError(RuntimeError):
    """Raised on every other rank when one rank's part of a collective `consolidate()` failed."""


@dataclass
class Contribution:
    """One rank's part of a consolidation.

    signature: (what, value) pairs every rank must agree on, in a fixed order.
    sums: Σ over this rank's samples of the importance, by parameter name.
    count: this rank's number of samples (0: it contributes zeros).
    """
    signature: list[tuple[str, str]]
    sums: dict[str, Tensor]
    count: int


def contribution(config: Mapping[str, Any], means: Mapping[str, Tensor], compensations: Mapping[str, Tensor],
                 count: int, params: Mapping[str, Tensor]) -> Contribution:
    """This rank's part for `params`: Σ|g| over its `count` samples, from its Kahan running
    mean and compensation (zeros when it saw none), and a signature of `config` and of each
    parameter's name, shape and dtype."""
    def local_sum(n: str, p: Tensor) -> Tensor:
        place = dict(device=p.device, dtype=acc_dtype(p.dtype))
        # The Kahan estimate of the mean is mean − compensation.
        return ((means[n] - compensations[n]) * count).to(**place) if count else torch.zeros(p.shape, **place)

    return Contribution(signature(config, params), {n: local_sum(n, p) for n, p in params.items()}, count)


def signature(config: Mapping[str, Any], params: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """What every rank must agree on: `config`'s values and each parameter's name, shape and dtype."""
    entries = [(key, repr(value)) for key, value in config.items()]
    return entries + [(f"parameter {n!r}", f"shape {tuple(params[n].shape)}, {params[n].dtype}")
                      for n in sorted(params)]


def agreed(contribute: Callable[[], Contribution]) -> Contribution:
    """Collective: this rank's `contribute()`, returned once every rank's succeeded with the same
    signature; otherwise every rank raises, as `union_mean` describes. Nothing is reduced (for
    sums that are reduced already)."""
    try:
        mine = contribute()
    except Exception as exc:
        _agree({"error": f"{type(exc).__name__}: {exc}"}, count=0)
        raise
    _agree({"signature": mine.signature}, mine.count)
    return mine


def union_mean(contribute: Callable[[], Contribution]) -> tuple[dict[str, Tensor], int]:
    """Collective: the mean importance over every rank's samples, and the total sample count.

    Each rank runs `contribute()` (its local importance pass); then all ranks exchange one
    small tensor each: an ok/failed flag, the sample count and a digest of the signature.
    Only when every rank succeeded with the same signature are the sums all-reduced
    (one all-reduce per dtype). Otherwise every rank raises, before any reduction:
    - a rank whose `contribute()` raised re-raises its own exception; the others raise
      RankFailedError naming each failed rank and its message;
    - differing signatures raise the same ValueError on every rank, naming the first
      difference (a parameter's name, shape or dtype, or a configuration value) and each
      rank's value.
    A rank that never calls this cannot be detected: the others wait for the process
    group's timeout (`init_process_group(timeout=...)`).
    """
    try:
        mine = contribute()
        shapes = {n: t.shape for n, t in mine.sums.items()}
        flats = _flat_by_dtype(mine.sums)  # before agreeing: a failure here is reported too
    except Exception as exc:
        _agree({"error": f"{type(exc).__name__}: {exc}"}, count=0)
        raise
    signature, count = mine.signature, mine.count
    del mine  # the flat buffers hold the sums now
    total = _agree({"signature": signature}, count)
    means: dict[str, Tensor] = {}
    for names, flat in flats:  # the same names and order on every rank: the signatures agree
        dist.all_reduce(flat)
        flat /= max(total, 1)
        for n, piece in zip(names, flat.split([shapes[n].numel() for n in names])):
            means[n] = piece.view(shapes[n])
    return {n: means[n] for n in shapes}, total


def _flat_by_dtype(tensors: Mapping[str, Tensor]) -> list[tuple[list[str], Tensor]]:
    """One flat buffer per dtype, dtypes and names in sorted order: (names, concatenation)."""
    flats = []
    for dtype in sorted({t.dtype for t in tensors.values()}, key=str):
        names = sorted(n for n, t in tensors.items() if t.dtype == dtype)
        flats.append((names, torch.cat([tensors[n].reshape(-1) for n in names])))
    return flats


def _agree(report: dict[str, Any], count: int) -> int:
    """Every rank's outcome: the total count if every rank succeeded with the same signature.

    One all-gather of (failed, count, payload size, payload digest) per rank; only when a
    rank failed or the digests differ, a second all-gather of the payloads (JSON), from
    which every rank builds the same error. A rank whose own report is an error returns
    (its caller re-raises its exception).
    """
    payload = json.dumps(report).encode()
    failed = "error" in report
    device = exchange_device()
    digest = struct.unpack("<4q", hashlib.sha256(payload).digest())
    header = torch.tensor([int(failed), count, len(payload), *digest], dtype=torch.int64)
    headers = _all_gather(header.to(device)).cpu()
    if not bool(headers[:, 0].any()) and bool((headers[:, 3:] == headers[0, 3:]).all()):
        return int(headers[:, 1].sum())
    sizes = headers[:, 2].tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    rows = _all_gather(padded.to(device)).cpu()
    reports = [json.loads(row[:size].numpy().tobytes()) for row, size in zip(rows, sizes)]
    if failed:
        return 0
    errors = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if "error" in rep]
    if errors:
        raise RankFailedError(f"consolidate() failed on another rank ({'; '.join(errors)}); every rank "
                              "raised before the reduction and no rank's MAS state changed")
    raise ValueError(_first_difference([[tuple(e) for e in rep["signature"]] for rep in reports]))


def _first_difference(signatures: list[list[tuple[str, str]]]) -> str:
    """'ranks disagree on <what>: rank 0: <value>; rank 1: <value>' for the first entry that
    differs between ranks (ranks with the same value grouped)."""
    for i in range(max(map(len, signatures))):
        entries = [s[i] if i < len(s) else ("nothing", "") for s in signatures]
        if len(set(entries)) == 1:
            continue
        whats = {what for what, _ in entries}
        same_what = len(whats) == 1
        by_value: dict[str, list[int]] = {}
        for rank, (what, value) in enumerate(entries):
            by_value.setdefault(value if same_what else f"{what} ({value})" if value else what, []).append(rank)
        shown = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {value}"
                          for value, ranks in by_value.items())
        return (f"ranks disagree on {next(iter(whats)) if same_what else 'the parameter list'}: {shown}. "
                "Every rank must consolidate the same model with the same MAS configuration; "
                "no rank's MAS state changed")
    return "ranks disagree on their MAS signature"  # only with a SHA-256 collision


def _all_gather(t: Tensor) -> Tensor:
    """Every rank's `t`, stacked by rank."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out)


def exchange_device() -> torch.device:
    """Where the exchange tensors live: CPU for gloo and MPI, else (NCCL and other
    accelerator-only backends) the current accelerator device."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or not torch.accelerator.is_available():
        return torch.device("cpu")
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
