"""Presets of the demo, with the λ of every regularised method per scenario.

The λ values come from `python -m mas_fast demo --search-lambda [--preset P]`: a grid search
on the validation digits with seed SEARCH_SEED (never one of the reported seeds), choosing
per (scenario, method) the λ with the best final average accuracy. See docs/continual-learning.md
for the grid and the search's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

SEARCH_SEED = 1000
LAMBDA_GRID = tuple(10.0 ** (e / 2) for e in range(-4, 11))  # 1e-2 … 1e5, half-decade steps


@dataclass(frozen=True)
class Config:
    name: str
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float                  # Adam's learning rate
    split_tasks: int
    permuted_tasks: int        # Permuted- and Rotated-MNIST
    seeds: tuple[int, ...]
    lambdas: dict[str, dict[str, float]] = field(default_factory=dict)

    def tasks(self, scenario: str) -> int:
        return self.split_tasks if scenario.startswith("split") else self.permuted_tasks

    def lambda_for(self, scenario: str, method: str) -> float:
        return self.lambdas.get(scenario, {}).get(method, 0.0)

    def with_overrides(self, **changes: Any) -> "Config":
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS = {
    # Fast enough for a 2-core CPU in a few minutes, with three seeds.
    "default": Config(
        name="default", hidden=(400, 400), epochs=2, batch_size=128, lr=1e-3,
        split_tasks=5, permuted_tasks=5, seeds=(0, 1, 2),
        lambdas={  # `--search-lambda` (docs/continual-learning.md); 10 ** 0.5 = 3.16
            "split-task": {"mas_per_sample": 1.0, "mas_batch": 1.0, "mas_local": 0.1, "ewc_online": 10 ** 3.5,
                           "si": 10 ** 2.5},
            "split-domain": {"mas_per_sample": 10 ** 0.5, "mas_batch": 10 ** 0.5, "mas_local": 1.0,
                             "ewc_online": 10 ** 4.5, "si": 10 ** 3.5},
            "permuted": {"mas_per_sample": 10 ** -0.5, "mas_batch": 10 ** -0.5, "mas_local": 10 ** -0.5,
                         "ewc_online": 1000.0, "si": 10 ** 2.5},
            "split-class": {"mas_per_sample": 100.0, "mas_batch": 100.0, "mas_local": 10.0, "ewc_online": 1e5,
                            "si": 1e5},
            "rotated": {"mas_per_sample": 10 ** -0.5, "mas_batch": 10 ** -0.5, "mas_local": 10 ** -0.5,
                        "ewc_online": 1000.0, "si": 10 ** 2.5},
        }),
    # Hsu, Liu, Ramasamy & Kira 2018, "Re-evaluating continual learning scenarios":
    # MLP 2×400, Adam lr 1e-3, batch 128, 4 epochs per task, Permuted-MNIST with 10 tasks.
    "hsu2018": Config(
        name="hsu2018", hidden=(400, 400), epochs=4, batch_size=128, lr=1e-3,
        split_tasks=5, permuted_tasks=10, seeds=(0, 1, 2),
        lambdas={  # `--search-lambda --preset hsu2018`
            "split-task": {"mas_per_sample": 0.1, "mas_batch": 0.1, "mas_local": 0.1, "ewc_online": 1000.0,
                           "si": 10 ** 2.5},
            "split-domain": {"mas_per_sample": 10 ** 0.5, "mas_batch": 10 ** 0.5, "mas_local": 1.0,
                             "ewc_online": 1e5, "si": 10 ** 3.5},
            "permuted": {"mas_per_sample": 10 ** -1.5, "mas_batch": 10 ** -1.5, "mas_local": 10 ** -1.5,
                         "ewc_online": 10 ** 2.5, "si": 10 ** 1.5},
            "split-class": {"mas_per_sample": 10 ** 2.5, "mas_batch": 100.0, "mas_local": 10 ** 0.5,
                            "ewc_online": 10 ** 0.5, "si": 1000.0},
            "rotated": {"mas_per_sample": 10 ** -0.5, "mas_batch": 10 ** -0.5, "mas_local": 10 ** -0.5,
                        "ewc_online": 1000.0, "si": 10 ** 2.5},
        }),
}
