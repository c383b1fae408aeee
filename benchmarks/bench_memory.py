"""Memory per rank of MAS on an FSDP2-sharded ~50M-parameter transformer, at 1, 2 and 4 gloo ranks.

For each world size, fresh CPU processes (one per rank) shard a GPT-2-style model (12 blocks,
width 512, vocabulary 16,000, untied head: 54M parameters, random init) with `fully_shard`
per block and at the root, then measure on every rank:
- the MAS state it holds (`mas.memory_bytes()`: Ω, θ*) after `consolidate`, and the running
  task's sums (mean and Kahan compensation) after `accumulate` of one batch of the next task;
- the peak resident memory added by the importance pass (`consolidate` over 2 batches of
  2×32 tokens) and by one training step with the penalty (`loss + mas.penalty()`, backward,
  AdamW step), each above the resident memory just before it (Linux peak-RSS reset through
  /proc/self/clear_refs; glibc's mmap threshold fixed, see `measure`).
Sizes in MiB; the largest rank is reported. Results: benchmarks/results/memory/<device>.json.

    python benchmarks/bench_memory.py            # or: pytest benchmarks/bench_memory.py
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# This checkout's mas_fast, in the spawned ranks too (they re-import this module).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLDS = (1, 2, 4)
MiB = 2 ** 20


def make_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=16000, n_positions=64, n_embd=512, n_layer=12, n_head=8,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _peak_added(fn) -> int:
    """Peak resident bytes `fn()` adds above the resident memory before it."""
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak to the current RSS
        f.write("5")
    before, _ = _rss()
    fn()
    return _rss()[1] - before


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from mas_fast import MAS

        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        g = torch.Generator().manual_seed(rank)
        tokens = [torch.randint(0, 16000, (2, 32), generator=g) for _ in range(3)]
        mas = MAS(model, lambda_=1.0, output_fn=lambda out: out.logits, verify=False)
        importance = _peak_added(lambda: mas.consolidate(tokens[:2], progress=False))
        state = mas.memory_bytes()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            out = model(tokens[2], labels=tokens[2])
            (out.loss + mas.penalty()).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        train_step()  # optimizer state and gradients exist from here on, as in training
        step = _peak_added(train_step)
        mas.accumulate(tokens[2])  # the next task's running sums
        state["task"] = mas.memory_bytes()["task"]
        state["total"] = state["omega"] + state["theta_star"] + state["task"]
        params = sum(p.numel() for p in model.parameters())
        row = dict(world=world, rank=rank, parameters=params, state_bytes=state,
                   importance_peak_added_bytes=importance, train_step_peak_added_bytes=step)
        with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int) -> list[dict]:
    """Every rank's row at `world` ranks. The ranks run with glibc's mmap threshold fixed at
    64 KiB: every larger block is mapped and unmapped on its own, so resident memory follows
    the live tensors (with the default adaptive threshold, freed blocks of up to 32 MiB stay in
    the heap and peak RSS overstates the live peak by hundreds of MiB)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by each spawned rank's C library at start
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, _free_port(), out), nprocs=world, start_method="spawn")
        return [json.load(open(os.path.join(out, f"{world}-{r}.json"))) for r in range(world)]


def summary(rows: list[dict]) -> dict:
    """The largest rank's numbers, in MiB."""
    worst = lambda key: max(r[key] for r in rows) / MiB  # noqa: E731
    state = {k: max(r["state_bytes"][k] for r in rows) / MiB for k in ("omega", "theta_star", "task", "total")}
    return dict(world=rows[0]["world"], parameters=rows[0]["parameters"],
                state_mib=state, importance_peak_added_mib=worst("importance_peak_added_bytes"),
                train_step_peak_added_mib=worst("train_step_peak_added_bytes"))


def run() -> str:
    from mas_fast.machine import device_name

    results = [summary(measure(world)) for world in WORLDS]
    device = device_name("cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40]  # as common.write_results names files
    # A folder of its own: results/*.json are the timing suites that plot.py charts.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory", f"{slug}.json")
    with open(path, "w") as f:
        json.dump({"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "model": "GPT-2 style, 12 blocks, width 512, vocab 16000, untied head, fp32",
                   "results": results}, f, indent=1)
    for r in results:
        print(f"world {r['world']}: state {r['state_mib']['omega'] + r['state_mib']['theta_star']:.1f} MiB/rank "
              f"(omega {r['state_mib']['omega']:.1f}, running task {r['state_mib']['task']:.1f}), "
              f"importance pass +{r['importance_peak_added_mib']:.0f} MiB, "
              f"train step +{r['train_step_peak_added_mib']:.0f} MiB")
    return path


def test_state_per_rank_falls_as_one_over_world():
    """Runs the measurement, writes the results, and checks the 1/world scaling of the state and
    of the running task."""
    import pytest

    if not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"):
        pytest.skip("needs Linux and torch.distributed with gloo")
    with open(run()) as f:
        results = json.load(f)["results"]
    one = results[0]["state_mib"]
    for r in results[1:]:
        for key in ("omega", "task"):
            assert r["state_mib"][key] <= one[key] / r["world"] * 1.01, key


if __name__ == "__main__":
    print(run())
