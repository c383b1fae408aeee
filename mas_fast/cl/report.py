"""Terminal tables and results.json for the demo's runs."""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ..machine import cpu_name, device_name
from .config import Config
from .metrics import mean_std, seen_task_accuracy, summarise
from .scenarios import TITLES as VISION_TITLES
from .text_data import DOMAINS, TEXT_SCENARIO, TEXT_TITLE
from .train import RunResult

if TYPE_CHECKING:
    from .text import TextConfig

TITLES = {**VISION_TITLES, TEXT_SCENARIO: TEXT_TITLE}

TIMES = ("train_s", "importance_s", "penalty_s")


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def machine() -> str:
    """The CPU model and core count (and the GPU when one is visible)."""
    gpu = f", {device_name('cuda')}" if torch.cuda.is_available() else ""
    return f"{cpu_name()}{gpu}"


def group(runs: Sequence[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    """scenario → method → runs (over seeds), in the order they ran."""
    out: dict[str, dict[str, list[RunResult]]] = {}
    for r in runs:
        out.setdefault(r.scenario, {}).setdefault(r.method, []).append(r)
    return out


def summary(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of ACC, BWT, forgetting and the three times."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for k, v in {**summarise(r.R, r.metric), **{t: getattr(r, t) for t in TIMES}}.items():
            values.setdefault(k, []).append(v)
    return {k: dict(zip(("mean", "std"), mean_std(v))) for k, v in values.items()}


def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:6.1f} ± {100 * s['std']:4.1f}"


def scenario_table(method_runs: dict[str, list[RunResult]]) -> str:
    """One row per method: λ, ACC, BWT, forgetting (%, mean ± std over seeds), mean seconds."""
    rows = []
    for method, runs in method_runs.items():
        s = summary(runs)
        lam = f"{runs[0].lambda_:g}" if runs[0].lambda_ else "-"
        rows.append([method, lam, _pct(s["acc"]), _pct(s["bwt"]), _pct(s["forgetting"]),
                     *(f"{s[t]['mean']:.2f}" for t in TIMES)])
    return text_table(["method", "λ", "ACC %", "BWT %", "forgetting %", "train s", "importance s",
                       "penalty s"], rows)


def loss_table(method_runs: dict[str, list[RunResult]]) -> str:
    """Text runs, one row per method: each domain's test loss (nats/byte) after each task,
    the final perplexities, the first domain's forgetting (loss rise), mean seconds; mean ±
    std over seeds."""
    rows = []
    for method, runs in method_runs.items():
        s = summary(runs)
        cells = []
        for t in range(len(runs[0].R)):
            for j in range(len(DOMAINS)):
                m, sd = mean_std([r.R[t][j] for r in runs])
                cells.append(f"{m:.3f} ± {sd:.3f}")
        ppl = [f"{mean_std([math.exp(r.R[-1][j]) for r in runs])[0]:.2f}" for j in range(len(DOMAINS))]
        lam = f"{runs[0].lambda_:g}" if runs[0].lambda_ else "-"
        forgetting = f"{s['forgetting']['mean']:+.3f} ± {s['forgetting']['std']:.3f}"
        rows.append([method, lam, *cells, " / ".join(ppl), forgetting, *(f"{s[t]['mean']:.2f}" for t in TIMES)])
    after = [f"{d} after {t + 1}" for t in range(len(next(iter(method_runs.values()))[0].R)) for d in DOMAINS]
    return text_table(["method", "λ", *after, "final ppl " + "/".join(DOMAINS), f"{DOMAINS[0]} forgetting",
                       "train s", "importance s", "penalty s"], rows)


def print_tables(runs: Sequence[RunResult], seeds: Sequence[int]) -> None:
    for scenario, method_runs in group(runs).items():
        first = next(iter(method_runs.values()))  # the first method's runs, one per seed
        tasks = len(first[0].R)
        if first[0].metric == "loss":
            print(f"\n{TITLES[scenario]}: {tasks} tasks, seeds {' '.join(str(r.seed) for r in first)}, "
                  "test windows, loss in nats/byte")
            print(loss_table(method_runs))
        else:
            print(f"\n{TITLES[scenario]}: {tasks} tasks, seeds {' '.join(map(str, seeds))}, test digits")
            print(scenario_table(method_runs))


def results_document(config: Config, runs: Sequence[RunResult], *, source: str, device: str,
                     backend: str, seconds: float, text_config: Optional["TextConfig"] = None) -> dict[str, Any]:
    """Everything needed to redo the tables and plots: config, machine, every run, summaries.

    Text runs (`metric` "loss") hold losses in R and `seen_task_loss` curves."""
    scenarios = {}
    for scenario, method_runs in group(runs).items():
        scenarios[scenario] = {
            method: {
                "lambda": rs[0].lambda_,
                "summary": summary(rs),
                "runs": [{"seed": r.seed, "R": r.R, **summarise(r.R, r.metric),
                          f"seen_task_{r.metric}": seen_task_accuracy(r.R),
                          **{t: getattr(r, t) for t in TIMES}} for r in rs],
            } for method, rs in method_runs.items()
        }
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(config).items() if k != "lambdas"},
        **({"text_config": {**asdict(text_config), "domains": list(DOMAINS)}} if text_config is not None else {}),
        "data": source, "device": device, "machine": machine(), "backend": backend,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "total_seconds": seconds, "scenarios": scenarios,
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
