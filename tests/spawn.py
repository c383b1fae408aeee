"""Spawning gloo ranks for a test: every rank saves its results; a hang fails the test. Also a
loader that fails part-way, for the failing-rank tests."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp

TIMEOUT_S = 240


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, args: tuple, world: int, out_dir: Path) -> list:
    """Spawn `world` ranks of worker(rank, *args), each writing out_dir/rank{r}.pt; returns what
    they wrote. Fails (never hangs) when they do not finish within TIMEOUT_S."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


class BrokenLoader:
    """Yields one batch, then raises (a failing data pipeline)."""

    def __init__(self, x):
        self.x = x

    def __iter__(self):
        yield self.x
        raise RuntimeError("rank 1's loader broke")
