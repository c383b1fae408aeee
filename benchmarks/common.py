"""Shared benchmark plumbing: device description, timing via pytest-benchmark, result rows.

A benchmark test times each implementation with `measure(benchmark, fn)` (pytest-benchmark
pedantic rounds, CUDA-synchronised) and files the median with `record(...)`; two variants
whose ratio is the point are timed back to back in every round with `paired(fn_a, fn_b)`. At the end of
the session conftest.py writes every row plus the ratio of each row to the baseline of its
group, measured in the same run, to benchmarks/results/<suite>-<device>.json (a partial run
replaces only the groups it measured).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import re
import statistics
import time
from typing import Any, Callable

import torch

from mas_fast.machine import device_name

ROWS: list[dict[str, Any]] = []
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(benchmark, fn: Callable[[], Any], device: str = "cpu", rounds: int = 10,
            warmup: int = 2, setup: Callable[[], Any] | None = None) -> float:
    """Median seconds of `fn` over `rounds` (after `warmup`), timed by pytest-benchmark."""
    def run():
        fn()
        sync(device)

    for _ in range(warmup):
        if setup:
            setup()
        run()
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    return float(benchmark.stats.stats.median)


def paired(fn_a: Callable[[], Any], fn_b: Callable[[], Any], device: str = "cpu", rounds: int = 40,
           warmup: int = 3, clock: Callable[[], float] | None = None) -> tuple[float, float, float]:
    """(median seconds of fn_a, of fn_b, median over rounds of fn_b's time / fn_a's).

    Each round times both back to back, alternating which goes first: a busy machine loads
    both alike within a round, so the per-round ratio is far steadier than the ratio of two
    medians measured minutes apart. `clock` defaults to time.perf_counter (wall time);
    time.process_time (the process's CPU time) leaves out the time other jobs hold the cores."""
    def timed(fn: Callable[[], Any]) -> float:
        now = clock or time.perf_counter
        sync(device)
        start = now()
        fn()
        sync(device)
        return now() - start

    for _ in range(warmup):
        fn_a()
        fn_b()
    a, b = [], []
    for i in range(rounds):
        if i % 2:
            b.append(timed(fn_b))
            a.append(timed(fn_a))
        else:
            a.append(timed(fn_a))
            b.append(timed(fn_b))
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def record(suite: str, group: str, name: str, seconds: float, device: str, *,
           baseline: bool = False, **extra: Any) -> None:
    """File one timing. Each group needs exactly one row with baseline=True."""
    ROWS.append(dict(suite=suite, group=group, name=name, seconds=seconds, device=device,
                     baseline=baseline, **extra))


_CURRENT: dict[Any, Any] = {}


def current(key: Any, make: Callable[[], Any]) -> Any:
    """`make()`'s result for `key`, kept until another key is asked for: benchmarks at
    100M parameters hold one size's tensors at a time."""
    if key not in _CURRENT:
        _CURRENT.clear()
        gc.collect()
        _CURRENT[key] = make()
    return _CURRENT[key]


def timings(suite: str, methods: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """group → {name: seconds} of this run's rows of `suite` (only groups measuring every one
    of `methods`, when given); skips the calling test when the suite has no rows."""
    import pytest

    out: dict[str, dict[str, float]] = {}
    for r in ROWS:
        if r["suite"] == suite:
            out.setdefault(r["group"], {})[r["name"]] = r["seconds"]
    if not out:
        pytest.skip(f"no {suite} rows in this run")
    return {g: t for g, t in out.items() if all(m in t for m in methods)}


def _kept_groups(path: str, device: str, measured: set[str]) -> list[dict[str, Any]]:
    """Rows of an earlier results file for the same device whose group this run did not
    measure: a partial run (`-k ...`) replaces whole groups, so every ratio still compares
    timings of one run."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    if old.get("device") != device:
        return []
    return [r for r in old.get("rows", []) if r.get("group") not in measured]


def write_results() -> list[str]:
    """Write one JSON per (suite, device) with ratios to the group's baseline; returns paths.
    Groups measured in this run replace their earlier rows; other groups of the file stay."""
    paths = []
    today = datetime.date.today().isoformat()
    keys = sorted({(r["suite"], r["device"]) for r in ROWS})
    for suite, device in keys:
        rows = [dict(r, date=today) for r in ROWS if r["suite"] == suite and r["device"] == device]
        base = {r["group"]: r["seconds"] for r in rows if r["baseline"]}
        for r in rows:
            if r["group"] in base:
                r["ratio_to_baseline"] = r["seconds"] / base[r["group"]]
        name = device_name(device)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
        path = os.path.join(os.environ.get("MAS_FAST_BENCH_OUT", RESULTS_DIR), f"{suite}-{slug}.json")
        rows = _kept_groups(path, name, {r["group"] for r in rows}) + rows
        doc = {
            "suite": suite, "device": name, "device_kind": device.split(":")[0],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": today, "rows": rows,
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        paths.append(path)
    return paths
