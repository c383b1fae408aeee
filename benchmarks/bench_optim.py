"""Fused optimizer steps with the MAS penalty: vs torch.optim (AdamW, CPU), and proximal vs explicit.

`test_adamw_step`, at 1M/25M/100M parameters, with the parameter layout of bench_penalty.py
(fp32 1024×1024 layers + biases, grads present, MAS holding θ* and Ω for every parameter):
- torch AdamW (baseline): torch.optim.AdamW(foreach=True).step(), no penalty at all;
- fused AdamW+MAS: mas_fast.optim.AdamW(regularizer=mas).step() (cpp backend), penalty folded in;
- torch AdamW + autograd penalty: `(mas.penalty() in the loss).backward()` on the reference
  (autograd) backend, then torch's step — what a user of torch.optim pays today.
Each size runs with 1 thread and with all cores (see bench_penalty.py). `test_goals` checks
the bars on this run's rows: fused ≤ 1.15× the penalty-free torch step, and ≥ 2.5× faster
than torch AdamW + autograd penalty.

`test_proximal_step`, at 1M/10M parameters (same layout): mas_fast.optim's SGD (momentum 0.9),
Adam and AdamW with penalty_step="proximal" against the same optimizer's explicit step
(penalty_step="gradient", the baseline), on every speed backend usable here (CPU: reference,
cpp; CUDA: cuda, triton — the Triton interpreter is a test vehicle, not a speed backend),
timed back to back in each round (`common.paired`; on CPU by the process's CPU time, which the
time slices of other jobs on a busy machine do not inflate). `test_proximal_goal`: the median
of the per-round ratios proximal / explicit is ≤ 1.05 in every group.

`test_adamw_lean_state`: the fused AdamW step with MAS(state_dtype=torch.bfloat16) (Ω in bf16,
θ* in the parameters' dtype) against the float32 state, fp32 and bf16 parameters, in groups of
their own; `test_lean_goal`: lean ≤ 1.05× the float32 state from 25M parameters on (1M sits in
cache: reported, not a bar; see bench_penalty.py).
"""
from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.nn as nn

from bench_penalty import (LEAN_DTYPES, LEAN_STATES, SIZES, THREADS, check_lean_goal, group, make_terms,
                           rounds_for, with_threads)
from common import ROWS, current, measure, paired, record, timings
from mas_fast import MAS, ops, optim

SUITE = "optim"
LAM = 0.5
LR = 1e-4  # small: parameters stay near θ* over the timed steps
METHODS = ("torch AdamW", "fused AdamW+MAS", "torch AdamW + autograd penalty")
PROXIMAL_SIZES = {"1M": 1, "10M": 10}  # layers of 1,049,600 parameters
PROXIMAL_ROUNDS = {"1M": (300, 10), "10M": (60, 3)}  # (paired rounds, warm-up rounds)
PROXIMAL_BAR = 1.05
OPTIMIZERS = {"SGD": lambda params, **kw: optim.SGD(params, lr=LR, momentum=0.9, **kw),
              "Adam": lambda params, **kw: optim.Adam(params, lr=LR, **kw),
              "AdamW": lambda params, **kw: optim.AdamW(params, lr=LR, **kw)}


class Params(nn.Module):
    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(p.detach(), requires_grad=True) for p in params])


def make_task(layers: int, device: str = "cpu") -> tuple[Params, dict]:
    """A module holding `layers` layers' parameters (with grads) and a MAS state_dict covering them."""
    params, theta_star, omega = make_terms(layers)
    model = Params([p.to(device) for p in params])
    for p, q in zip(model.parameters(), params):
        p.grad = q.grad.to(device)
    theta_star, omega = ([t.to(device) for t in ts] for ts in (theta_star, omega))
    names = [n for n, _ in model.named_parameters()]
    state = MAS(model, lambda_=LAM).state_dict()
    state.update(num_tasks=1, omega=dict(zip(names, omega)), theta_star=dict(zip(names, theta_star)))
    return model, state


def task(size: str) -> tuple:
    return current(("optim", size), lambda: make_task(SIZES[size]))


@pytest.mark.skipif(ops.backend_status()["cpp"] is not None, reason=str(ops.backend_status()["cpp"]))
@pytest.mark.parametrize("size,threads,method", [(s, t, m) for s in SIZES for t in THREADS for m in METHODS])
def test_adamw_step(benchmark, size, threads, method):
    model, state = task(size)
    backend = "reference" if method == "torch AdamW + autograd penalty" else "cpp"
    mas = MAS(model, lambda_=LAM, backend=backend)
    mas.load_state_dict(state)
    if method == "fused AdamW+MAS":
        opt = optim.AdamW(model.parameters(), lr=LR, regularizer=mas)
        step = opt.step
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
        if method == "torch AdamW":
            step = opt.step
        else:
            def step():
                mas.penalty().backward()
                opt.step()
    n = sum(p.numel() for p in model.parameters())
    rounds, warmup = rounds_for(size, slow=method == "torch AdamW + autograd penalty")
    seconds = with_threads(threads, lambda: measure(benchmark, step, rounds=rounds, warmup=warmup))
    record(SUITE, group(size, threads), method, seconds, "cpu", baseline=method == "torch AdamW", params=n,
           threads=threads)
    del opt, mas
    gc.collect()


def speed_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs to time: the CPU ones, and the GPU ones when a GPU is here."""
    status = ops.backend_status()
    pairs = [("reference", "cpu"), ("cpp", "cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", "cuda"), ("triton", "cuda")]
    return [(b, d) for b, d in pairs if status[b] is None]


def proximal_cases() -> list[tuple[str, str, str, str, int]]:
    """(optimizer, backend, device, size, threads); GPU rows run once, not per CPU thread count."""
    return [(o, b, d, s, t) for b, d in speed_backends() for s in PROXIMAL_SIZES
            for t in (THREADS if d == "cpu" else THREADS[:1]) for o in OPTIMIZERS]


@pytest.mark.parametrize("optimizer,backend,device,size,threads", proximal_cases())
def test_proximal_step(optimizer, backend, device, size, threads):
    model, state = current(("proximal", size, device), lambda: make_task(PROXIMAL_SIZES[size], device))
    mas = MAS(model, lambda_=LAM, backend=backend)
    mas.load_state_dict(state)
    explicit, proximal = (OPTIMIZERS[optimizer](model.parameters(), regularizer=mas, penalty_step=step)
                          for step in ("gradient", "proximal"))
    rounds, warmup = PROXIMAL_ROUNDS[size]
    clock = time.process_time if device == "cpu" else None  # CPU: other jobs' time slices left out
    t_explicit, t_proximal, ratio = with_threads(
        threads, lambda: paired(explicit.step, proximal.step, device, rounds=rounds, warmup=warmup, clock=clock))
    name = f"{optimizer} {backend}, " + (group(size, threads) if device == "cpu" else size)
    n = sum(p.numel() for p in model.parameters())
    record(SUITE, name, "explicit", t_explicit, device, baseline=True, params=n, threads=threads, backend=backend)
    record(SUITE, name, "proximal", t_proximal, device, params=n, threads=threads, backend=backend,
           paired_ratio=ratio)
    print(f"{name}: proximal = {ratio:.3f}× explicit (median of {rounds} paired rounds)")
    del explicit, proximal, mas
    gc.collect()


def test_proximal_goal():
    """The proximal fused step costs ≤ 1.05× the explicit one: median per-round ratio, every group."""
    ratios = {r["group"]: r["paired_ratio"] for r in ROWS if r["suite"] == SUITE and "paired_ratio" in r}
    if not ratios:
        pytest.skip("no proximal rows in this run")
    failures = [f"{name}: {ratio:.3f}×" for name, ratio in ratios.items() if ratio > PROXIMAL_BAR]
    assert not failures, f"proximal / explicit above {PROXIMAL_BAR}: " + "; ".join(failures)


def test_goals():
    """The bars: fused ≤ 1.15× torch AdamW without penalty; ≥ 2.5× faster than + autograd penalty."""
    failures = []
    for name, t in timings(SUITE, METHODS).items():
        overhead = t["fused AdamW+MAS"] / t["torch AdamW"]
        speedup = t["torch AdamW + autograd penalty"] / t["fused AdamW+MAS"]
        print(f"{name}: fused = {overhead:.2f}× torch AdamW without penalty, "
              f"{speedup:.1f}× faster than torch AdamW + autograd penalty")
        if overhead > 1.15 or speedup < 2.5:
            failures.append(f"{name}: {overhead:.2f}× (goal ≤ 1.15), {speedup:.2f}× (goal ≥ 2.5)")
    assert not failures, "; ".join(failures)


LEAN_STATE_DTYPES = dict(zip(LEAN_STATES, (None, torch.bfloat16)))  # MAS(state_dtype=...) of each row


def make_lean_task(size: str, dtype: str) -> tuple[Params, dict]:
    """make_task's module in `dtype` (grads too) and its float32 MAS state."""
    model, state = make_task(SIZES[size])
    return model.to(LEAN_DTYPES[dtype]), state


@pytest.mark.skipif(ops.backend_status()["cpp"] is not None, reason=str(ops.backend_status()["cpp"]))
@pytest.mark.parametrize("size,threads,dtype,state", [(s, t, d, st) for s in SIZES for t in THREADS
                                                      for d in LEAN_DTYPES for st in LEAN_STATES])
def test_adamw_lean_state(benchmark, size, threads, dtype, state):
    model, full_state = current(("optim lean", size, dtype), lambda: make_lean_task(size, dtype))
    mas = MAS(model, lambda_=LAM, backend="cpp", state_dtype=LEAN_STATE_DTYPES[state])
    mas.load_state_dict(full_state)  # a lean MAS keeps it lean from the first penalty call on
    opt = optim.AdamW(model.parameters(), lr=LR, regularizer=mas)
    n = sum(p.numel() for p in model.parameters())
    rounds, warmup = rounds_for(size, slow=False)
    seconds = with_threads(threads, lambda: measure(benchmark, opt.step, rounds=rounds, warmup=warmup))
    record(SUITE, f"AdamW {dtype} params, " + group(size, threads), f"fused AdamW+MAS, {state}", seconds, "cpu",
           baseline=state == "float32 state", params=n, threads=threads)
    del opt, mas
    gc.collect()


def test_lean_goal():
    """The lean state's fused step ≤ 1.05× the float32 state's from 25M parameters on."""
    check_lean_goal(SUITE, "fused AdamW+MAS")
