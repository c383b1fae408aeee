"""The honest λ search: one λ per (scenario, method), chosen on validation digits.

Every λ of the grid is run once with seed SEARCH_SEED (not a reported seed) and evaluated
on the validation digits (held out of training, disjoint from the test digits). The λ with
the best final average accuracy (ACC) wins; ties go to the smaller λ. Choosing by BWT alone
would always pick the largest λ (a frozen network does not forget, nor learn).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import LAMBDA_GRID, SEARCH_SEED, Config
from .data import Splits
from .experiment import scenario_for
from .metrics import summarise
from .report import text_table
from .train import run


def search_lambdas(config: Config, splits: Splits, scenarios: Sequence[str], methods: Sequence[str],
                   device: torch.device, backend: str = "auto", grid: Sequence[float] = LAMBDA_GRID,
                   seed: int = SEARCH_SEED, progress: bool = True) -> dict[str, dict[str, Any]]:
    """scenario → method → {"grid", "acc", "bwt", "best"} measured on the validation digits."""
    from tqdm.auto import tqdm

    total = sum(config.tasks(s) for s in scenarios) * len(methods) * len(grid)
    out: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc="λ search (validation)", unit="task", disable=not progress) as bar:
        for name in scenarios:
            scenario = scenario_for(name, splits, config, seed, device, evaluate_on="val")
            for method in methods:
                accs, bwts = [], []
                for lam in grid:
                    bar.set_postfix_str(f"{name} | {method} | λ {lam:g}")
                    metrics = summarise(run(scenario, method, config, seed, lam, backend, on_task=bar.update).R)
                    accs.append(metrics["acc"])
                    bwts.append(metrics["bwt"])
                best = max(range(len(grid)), key=lambda i: (accs[i], -i))
                out.setdefault(name, {})[method] = {"grid": list(grid), "acc": accs, "bwt": bwts,
                                                    "best": grid[best]}
    return out


def search_table(found: dict[str, Any]) -> str:
    """Rows λ, columns method: validation ACC / BWT in %, the chosen λ marked with *."""
    methods = list(found)
    grid = found[methods[0]]["grid"]
    rows = []
    for i, lam in enumerate(grid):
        cells = [f"{100 * found[m]['acc'][i]:5.1f} / {100 * found[m]['bwt'][i]:6.1f}"
                 + ("*" if found[m]["best"] == lam else " ") for m in methods]
        rows.append([f"{lam:g}", *cells])
    return text_table(["λ", *(f"{m} ACC/BWT" for m in methods)], rows)
