"""Hsu et al. 2018's published λ on our digits: does a λ tuned in another code carry over?

    python -m mas_fast.cl.hsu2018 [--scenarios split-task split-domain] [--seeds 0 1 2]

Under the demo's `hsu2018` preset, each method runs at the reg_coef of Hsu et al.'s
scripts/split_MNIST_incremental_{task,domain,class}.sh (GT-RIPL/Continual-Learning-Benchmark
@ d78b9973), in the form their agents/regularization.py gives it:

- mas_hsu: MAS(convention="hsu"): Ω = |∇ mean over batch and outputs of F²|, averaged over
  batches of 128; penalty reg_coef · Σ Ω (θ − θ*)², so λ = reg_coef.
- si: their SI is ours (ω, Ω, ξ = 0.1, penalty c Σ Ω (θ − θ*)²), so c = reg_coef.
- ewc_online and ewc (one penalty per task): their penalty is reg_coef · Σ F (θ − θ*)², ours
  (λ/2) Σ F (θ − θ*)², so λ = 2 · reg_coef. Their Fisher takes the model's predicted labels,
  ours the true ones.

It prints, per scenario, their λ, ours, and ACC / BWT on the test digits (mean ± std over
seeds); docs/baselines.md puts them next to the searched λ and Hsu et al.'s numbers.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from .config import PRESETS, Config
from .data import load_splits
from .experiment import scenario_for
from .metrics import mean_std, summarise
from .report import TITLES, text_table
from .scenarios import SCENARIOS
from .train import RunResult, run

# scripts/split_MNIST_incremental_*.sh: --reg_coef of MAS, SI, EWC_online_mnist and EWC_mnist.
HSU_REG_COEF = {
    "split-task": {"mas_hsu": 1.0, "si": 300.0, "ewc_online": 400.0, "ewc": 100.0},
    "split-domain": {"mas_hsu": 10000.0, "si": 3000.0, "ewc_online": 700.0, "ewc": 100.0},
    "split-class": {"mas_hsu": 1.0, "si": 600.0, "ewc_online": 100.0, "ewc": 600.0},
}
# Our λ per unit of their reg_coef (the factor of Σ Ω (θ − θ*)² in each penalty).
LAMBDA_PER_REG_COEF = {"mas_hsu": 1.0, "si": 1.0, "ewc_online": 2.0, "ewc": 2.0}


def published_runs(config: Config, scenarios: Sequence[str], device: torch.device,
                   backend: str = "auto") -> list[RunResult]:
    """Each scenario × method of HSU_REG_COEF × seed of `config`, at Hsu et al.'s λ."""
    splits = load_splits()
    runs = []
    for name in scenarios:
        for seed in config.seeds:
            scenario = scenario_for(name, splits, config, seed, device)
            for method, reg_coef in HSU_REG_COEF[name].items():
                runs.append(run(scenario, method, config, seed, LAMBDA_PER_REG_COEF[method] * reg_coef, backend))
    return runs


def table(runs: Sequence[RunResult], scenario: str) -> str:
    rows = []
    for method, reg_coef in HSU_REG_COEF[scenario].items():
        mine = [summarise(r.R) for r in runs if r.scenario == scenario and r.method == method]
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in
                 (mean_std([x[k] for x in mine]) for k in ("acc", "bwt"))]
        rows.append([method, f"{reg_coef:g}", f"{LAMBDA_PER_REG_COEF[method] * reg_coef:g}", *cells])
    return text_table(["method", "their λ", "our λ", "ACC %", "BWT %"], rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    choices = [s for s in SCENARIOS if s in HSU_REG_COEF]
    p = argparse.ArgumentParser(prog="python -m mas_fast.cl.hsu2018", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=choices, default=choices)
    p.add_argument("--seeds", type=int, nargs="+", help="default: the hsu2018 preset's")
    p.add_argument("--epochs", type=int, help="epochs per task (default: the preset's 4)")
    p.add_argument("--tasks", type=int, help="tasks per scenario (default: the preset's 5)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden widths (default: the preset's 400 400)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(list(argv) if argv is not None else None)
    config = PRESETS["hsu2018"].with_overrides(
        seeds=tuple(args.seeds) if args.seeds else None, epochs=args.epochs, split_tasks=args.tasks,
        hidden=tuple(args.hidden) if args.hidden else None)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        runs = published_runs(config, args.scenarios, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    for name in args.scenarios:
        print(f"\n{TITLES[name]}: Hsu et al.'s λ, preset hsu2018, seeds {' '.join(map(str, config.seeds))}, "
              "test digits")
        print(table(runs, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
