"""The honest λ search: one λ per (scenario, method), chosen on validation digits.

Every λ of the grid is run once with seed SEARCH_SEED (not a reported seed) and evaluated
on the validation digits (held out of training, disjoint from the test digits). The λ with
the best final average accuracy (ACC) wins; ties go to the smaller λ. Choosing by BWT alone
would always pick the largest λ (a frozen network does not forget, nor learn).

MAS methods are searched twice, once per penalty step of mas_fast.optim: "gradient" (the
explicit step on `loss + mas.penalty()`, what the demo runs) and "proximal" (the penalty's
proximal map folded into Adam's step); each step gets its own best λ, and the step whose
best validation ACC is higher wins (ties → "gradient").
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import LAMBDA_GRID, SEARCH_SEED, Config
from .data import Splits
from .experiment import scenario_for
from .metrics import summarise
from .report import text_table
from .train import penalty_steps, run


def _best(grid: Sequence[float], accs: Sequence[float]) -> float:
    """The λ of the highest ACC, the smaller λ on ties."""
    return grid[max(range(len(grid)), key=lambda i: (accs[i], -i))]


def search_lambdas(config: Config, splits: Splits, scenarios: Sequence[str], methods: Sequence[str],
                   device: torch.device, backend: str = "auto", grid: Sequence[float] = LAMBDA_GRID,
                   seed: int = SEARCH_SEED, progress: bool = True) -> dict[str, dict[str, Any]]:
    """scenario → method → {"grid", "acc", "bwt", "best"} of the gradient step, measured on the
    validation digits; MAS methods add "proximal": {"acc", "bwt", "best"} and "winner" (the step)."""
    from tqdm.auto import tqdm

    total = sum(config.tasks(s) for s in scenarios) * sum(len(penalty_steps(m)) for m in methods) * len(grid)
    out: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc="λ search (validation)", unit="task", disable=not progress) as bar:
        for name in scenarios:
            scenario = scenario_for(name, splits, config, seed, device, evaluate_on="val")
            for method in methods:
                entry: dict[str, Any] = {"grid": list(grid)}
                for step in penalty_steps(method):
                    accs, bwts = [], []
                    for lam in grid:
                        bar.set_postfix_str(f"{name} | {method} | {step} | λ {lam:g}")
                        metrics = summarise(run(scenario, method, config, seed, lam, backend, on_task=bar.update,
                                                penalty_step=step).R)
                        accs.append(metrics["acc"])
                        bwts.append(metrics["bwt"])
                    found = {"acc": accs, "bwt": bwts, "best": _best(grid, accs)}
                    if step == "gradient":
                        entry.update(found)
                    else:
                        entry[step] = found
                if "proximal" in entry:
                    entry["winner"] = "proximal" if max(entry["proximal"]["acc"]) > max(entry["acc"]) else "gradient"
                out.setdefault(name, {})[method] = entry
    return out


def _columns(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Column name → {"acc", "bwt", "best"}: each method's gradient step, then its proximal one."""
    columns = {}
    for m, entry in found.items():
        columns[m] = entry
        if "proximal" in entry:
            columns[f"{m} prox"] = entry["proximal"]
    return columns


def search_table(found: dict[str, Any]) -> str:
    """Rows λ, columns method (and its proximal step): validation ACC / BWT in %, the best λ marked with *."""
    columns = _columns(found)
    grid = next(iter(found.values()))["grid"]
    rows = []
    for i, lam in enumerate(grid):
        cells = [f"{100 * c['acc'][i]:5.1f} / {100 * c['bwt'][i]:6.1f}" + ("*" if c["best"] == lam else " ")
                 for c in columns.values()]
        rows.append([f"{lam:g}", *cells])
    return text_table(["λ", *(f"{name} ACC/BWT" for name in columns)], rows)


def steps_table(found: dict[str, Any]) -> str:
    """One row per MAS method: each step's best λ with its validation ACC / BWT in %, and the winner."""
    def cell(entry: dict[str, Any], grid: list[float]) -> str:
        i = grid.index(entry["best"])
        return f"λ {entry['best']:g}: {100 * entry['acc'][i]:.1f} / {100 * entry['bwt'][i]:.1f}"

    rows = [[m, cell(e, e["grid"]), cell(e["proximal"], e["grid"]), e["winner"]]
            for m, e in found.items() if "proximal" in e]
    return text_table(["method", "gradient: best λ, ACC / BWT", "proximal: best λ, ACC / BWT", "wins"], rows)
