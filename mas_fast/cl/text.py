"""The text scenario: a byte-level GPT learns English prose, then Python source.

Each method starts task 2 from the same network: per seed, task 1 (prose) is trained once
(every method trains it identically: no penalty exists yet, joint = task 1's data) and
copied; then each method consolidates its importance on task 1's training windows and
trains task 2 (Python source; joint: both domains). After each task the model's mean
next-byte loss on every domain's held-out windows fills row t of the loss matrix R.
Reported: per-domain loss and perplexity after each task, forgetting of the first domain
(its loss rise), and time (the shared task-1 training is counted in every method's time).

λ per method comes from `TextConfig.lambdas`, chosen by `search_text_lambdas`: seed
SEARCH_SEED, validation windows; among the λ that at least halve fine-tuning's forgetting of
the first domain, the one with the lowest final mean validation loss (the vision scenarios'
criterion). The mean loss alone picks λ → 0 here: with two domains, the new one gains far
more from plasticity than the old one loses, and the point of MAS is to keep the old one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..regularizer import MAS
from .config import SEARCH_SEED
from .ewc import OnlineEWC
from .methods import TEXT_METHODS
from .text_data import DOMAINS, TEXT_SCENARIO, TextSplits, load_domain
from .text_model import ByteGPT, next_byte_loss
from .train import RunResult, Stopwatch

Tensor = torch.Tensor
IMPORTANCE_BATCH = 128  # never a preset's window length: with B == T the rules cannot tell samples from positions
EVAL_BATCH = 256
TEXT_LAMBDA_GRID = tuple(10.0 ** e for e in range(-6, 7))  # 1e-6 … 1e6: MAS's Ω and EWC's Fisher differ by decades
STABILITY = 0.5  # the λ search's λ keeps the first domain's forgetting at most this share of fine-tuning's


@dataclass(frozen=True)
class TextConfig:
    name: str
    seq_len: int               # bytes per window (= the model's context)
    width: int
    layers: int
    heads: int
    steps: int                 # Adam steps per task
    batch_size: int
    lr: float
    train_windows: int         # per domain
    val_windows: int
    test_windows: int
    importance_samples: int    # windows of the task in each importance pass
    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: dict[str, float] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> "TextConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# `python -m mas_fast demo --search-lambda --scenarios text` (docs/huggingface.md shows its table)
SEARCHED_LAMBDAS = {"mas_per_sample": 1e-3, "mas_batch": 1e-3, "mas_local": 1e-2, "ewc_online": 1e5}

TEXT_PRESETS = {
    # Sized for `make demo` on 2 CPU cores: about two minutes for 6 methods × 3 seeds.
    "default": TextConfig(
        name="default", seq_len=48, width=64, layers=2, heads=4, steps=120, batch_size=32, lr=3e-3,
        train_windows=4096, val_windows=256, test_windows=512, importance_samples=512,
        lambdas=SEARCHED_LAMBDAS),
    "large": TextConfig(
        name="large", seq_len=120, width=128, layers=4, heads=4, steps=500, batch_size=32, lr=1e-3,
        train_windows=3200, val_windows=256, test_windows=384, importance_samples=1024,  # prose: 3,885 windows
        lambdas=SEARCHED_LAMBDAS),  # the default size's λ, not searched again at this size
}


def text_domains(config: TextConfig) -> list[TextSplits]:
    """The domains in learning order, cut into the config's held-out windows."""
    return [load_domain(d, config.seq_len, config.train_windows, config.val_windows, config.test_windows)
            for d in DOMAINS]


@torch.no_grad()
def domain_loss(model: nn.Module, ids: Tensor) -> float:
    """Mean next-byte cross-entropy (nats per byte) of `model` over the windows `ids`."""
    was_training = model.training
    model.eval()
    total = sum(float(next_byte_loss(model(batch), batch, "sum")) for batch in ids.split(EVAL_BATCH))
    model.train(was_training)
    return total / len(ids)


class _Regulariser:
    """MAS in one mode, or online EWC, behind consolidate / add_penalty_grad_ / importance."""

    def __init__(self, method: str, model: nn.Module, lambda_: float, backend: str) -> None:
        if method.startswith("mas_"):
            self.impl: Any = MAS(model, lambda_=lambda_, mode=method[len("mas_"):], backend=backend)
        else:
            self.impl = OnlineEWC(model, lambda_, lambda out, ids: next_byte_loss(out, ids, "sum"), backend=backend)

    def consolidate(self, ids: Tensor) -> None:
        batches = ids.split(IMPORTANCE_BATCH)
        if isinstance(self.impl, MAS):
            self.impl.consolidate(batches, progress=False)
        else:  # EWC's labels are the windows themselves: the model predicts their next bytes
            self.impl.consolidate(zip(batches, batches))

    def add_penalty_grad_(self) -> None:
        self.impl.add_penalty_grad_()

    @property
    def importance(self) -> dict[str, Tensor]:
        values = self.impl.importance if isinstance(self.impl, MAS) else self.impl.fisher
        return {n: v.detach().cpu() for n, v in values.items()}


def train_task(model: nn.Module, ids: Tensor, config: TextConfig, generator: torch.Generator,
               regulariser: Optional[_Regulariser], penalty_clock: Stopwatch) -> None:
    """`config.steps` Adam steps on mini-batches of `ids` (reshuffled every pass over them)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order = torch.randperm(len(ids), generator=generator)
        batch, order = ids[order[:config.batch_size].to(ids.device)], order[config.batch_size:]
        loss = next_byte_loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        if regulariser is not None:
            with penalty_clock:
                regulariser.add_penalty_grad_()
        opt.step()


def run_seed(config: TextConfig, methods: Sequence[str], seed: int, device: torch.device,
             lambdas: Optional[dict[str, float]] = None, backend: str = "auto", evaluate_on: str = "test",
             on_task: Optional[Callable[[], None]] = None) -> list[RunResult]:
    """Every method of `methods` on the text domains with one seed (see the module docstring);
    λ from `lambdas` (default: the config's)."""
    lambdas = config.lambdas if lambdas is None else lambdas
    return run_variants(config, [(m, lambdas.get(m, 0.0)) for m in methods], seed, device, backend, evaluate_on,
                        on_task)


def run_variants(config: TextConfig, variants: Sequence[tuple[str, float]], seed: int, device: torch.device,
                 backend: str = "auto", evaluate_on: str = "test",
                 on_task: Optional[Callable[[], None]] = None) -> list[RunResult]:
    """One run per (method, λ) of `variants`, all continuing from one shared task-1 network."""
    unknown = [m for m, _ in variants if m not in TEXT_METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} do not run on the text scenario; choose from {TEXT_METHODS}")
    if evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', got {evaluate_on!r}")
    domains = [TextSplits(*(t.to(device) for t in (d.train, d.val, d.test))) for d in text_domains(config)]
    held = [d.test if evaluate_on == "test" else d.val for d in domains]

    def losses(model: nn.Module) -> list[float]:
        return [domain_loss(model, ids) for ids in held]

    torch.manual_seed(seed)
    first = ByteGPT(config.seq_len, config.width, config.layers, config.heads).to(device)
    generator = torch.Generator().manual_seed(seed)
    first_clock = Stopwatch(device)
    with first_clock:
        train_task(first, domains[0].train, config, generator, None, Stopwatch(device))
    after_first = losses(first)
    if on_task is not None:
        on_task()

    results = []
    for method, lam in variants:
        model = copy.deepcopy(first)
        penalised = method not in ("finetune", "joint")
        lam = float(lam) if penalised else 0.0
        regulariser = _Regulariser(method, model, lam, backend) if penalised else None
        train_clock, importance_clock, penalty_clock = Stopwatch(device), Stopwatch(device), Stopwatch(device)
        train_clock.seconds = first_clock.seconds
        R = [after_first]
        for t in range(1, len(domains)):
            if regulariser is not None:
                with importance_clock:
                    regulariser.consolidate(domains[t - 1].train[:config.importance_samples])
            ids = torch.cat([d.train for d in domains[:t + 1]]) if method == "joint" else domains[t].train
            task_generator = torch.Generator().manual_seed(seed * 1000 + t)  # same batches for every method
            with train_clock:
                train_task(model, ids, config, task_generator, regulariser, penalty_clock)
            R.append(losses(model))
            if on_task is not None:
                on_task()
        importance = regulariser.importance if regulariser is not None else {}
        results.append(RunResult(TEXT_SCENARIO, method, seed, lam, R, train_clock.seconds,
                                 importance_clock.seconds, penalty_clock.seconds, importance, metric="loss"))
    return results


def run_text(config: TextConfig, methods: Sequence[str], device: torch.device, backend: str = "auto",
             progress: bool = True) -> list[RunResult]:
    """Every method × seed of `config` on the test windows, with the config's λ."""
    from tqdm.auto import tqdm

    total = len(config.seeds) * (1 + len(methods) * (len(DOMAINS) - 1))
    results: list[RunResult] = []
    with tqdm(total=total, desc="text (prose → Python)", unit="task", disable=not progress) as bar:
        for seed in config.seeds:
            bar.set_postfix_str(f"seed {seed}")
            results += run_seed(config, methods, seed, device, backend=backend, on_task=bar.update)
    return results


def search_text_lambdas(config: TextConfig, methods: Sequence[str], device: torch.device, backend: str = "auto",
                        grid: Sequence[float] = TEXT_LAMBDA_GRID, seed: int = SEARCH_SEED,
                        progress: bool = True) -> dict[str, dict[str, Any]]:
    """method → {"grid", "final_loss", "forgetting", "new_gain", "best"} on the validation windows.

    Fine-tuning runs alongside: `best` is the λ with the lowest final mean loss among those
    whose first-domain forgetting is at most STABILITY × fine-tuning's (else the least forgetting).
    """
    from tqdm.auto import tqdm

    from .metrics import summarise

    variants = [("finetune", 0.0)] + [(m, lam) for m in methods for lam in grid]
    with tqdm(total=1 + len(variants), desc="text λ search (validation)", unit="task", disable=not progress) as bar:
        runs = run_variants(config, variants, seed, device, backend, "val", on_task=bar.update)

    def gain(R: list[list[float]]) -> float:  # the new domain's loss reduction by its task
        return R[-2][-1] - R[-1][-1]

    ft_gain, ft_forgetting = gain(runs[0].R), summarise(runs[0].R, "loss")["forgetting"]
    found: dict[str, dict[str, Any]] = {m: {"grid": list(grid), "final_loss": [], "forgetting": [], "new_gain": []}
                                        for m in methods}
    for r in runs[1:]:
        metrics = summarise(r.R, "loss")
        entry = found[r.method]
        entry["final_loss"].append(metrics["final_loss"])
        entry["forgetting"].append(metrics["forgetting"])
        entry["new_gain"].append(gain(r.R))
    for entry in found.values():
        forgetting = entry["forgetting"]
        eligible = [i for i, f in enumerate(forgetting) if f <= STABILITY * ft_forgetting] \
            or [min(range(len(grid)), key=lambda i: (forgetting[i], i))]
        entry["best"] = grid[min(eligible, key=lambda i: (entry["final_loss"][i], i))]
        entry["finetune"] = {"forgetting": ft_forgetting, "new_gain": ft_gain}
    return found


def text_search_table(found: dict[str, Any]) -> str:
    """Rows λ, columns method: validation loss reduction on the new domain / forgetting of the
    first (nats/byte), * = chosen; last row: fine-tuning."""
    from .report import text_table

    methods = list(found)
    grid = found[methods[0]]["grid"]
    rows = [[f"{lam:g}", *(f"{found[m]['new_gain'][i]:.3f} / {found[m]['forgetting'][i]:+.3f}"
                           + ("*" if found[m]["best"] == lam else " ") for m in methods)]
            for i, lam in enumerate(grid)]
    ft = found[methods[0]]["finetune"]
    rows.append(["finetune", *([f"{ft['new_gain']:.3f} / {ft['forgetting']:+.3f} "] * len(methods))])
    return text_table(["λ", *(f"{m} gain/forgetting" for m in methods)], rows)
