"""Every (scenario, method, seed) run of the demo, with one tqdm bar over all their tasks."""
from __future__ import annotations

from typing import Sequence

import torch

from .config import Config
from .data import Splits
from .scenarios import Scenario, make_scenario
from .train import RunResult, run


def scenario_for(name: str, splits: Splits, config: Config, seed: int, device: torch.device,
                 evaluate_on: str = "test") -> Scenario:
    """Scenario `name` on `device` (Permuted-MNIST's permutations are drawn from `seed`)."""
    return make_scenario(name, splits, config.tasks(name), seed, evaluate_on).to(device)


def run_all(config: Config, splits: Splits, scenarios: Sequence[str], methods: Sequence[str],
            device: torch.device, backend: str = "auto", progress: bool = True) -> list[RunResult]:
    """Each scenario × method × seed of `config`, evaluated on the test digits, with its λ."""
    from tqdm.auto import tqdm

    total = sum(config.tasks(s) for s in scenarios) * len(methods) * len(config.seeds)
    results = []
    with tqdm(total=total, desc="continual learning", unit="task", disable=not progress) as bar:
        for name in scenarios:
            for seed in config.seeds:
                scenario = scenario_for(name, splits, config, seed, device)
                for method in methods:
                    bar.set_postfix_str(f"{name} | {method} | seed {seed}")
                    results.append(run(scenario, method, config, seed, config.lambda_for(name, method),
                                       backend, on_task=bar.update))
    return results
