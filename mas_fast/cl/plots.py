"""PNG plots of the demo: accuracy-matrix heatmaps, accuracy-over-tasks curves, Ω histograms."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .metrics import seen_task_accuracy
from .report import TITLES, group
from .train import RunResult

# What R holds → (scale, label of R, label of the seen-task curve); losses use the data's range.
STYLES = {"accuracy": (100.0, "accuracy (%)", "mean accuracy on seen tasks (%)"),
          "loss": (1.0, "test loss (nats/byte)", "mean test loss on seen tasks (nats/byte)")}
CURVE_COLUMNS = 3  # scenarios per row of the accuracy-curve figure


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def accuracy_matrices(runs: Sequence[RunResult], scenario: str, path: str) -> None:
    """One heatmap per method of R averaged over seeds (row: after task i, column: task j)."""
    plt = pyplot()
    method_runs = group(runs)[scenario]
    metric = next(iter(method_runs.values()))[0].metric
    scale, label, _ = STYLES[metric]
    means = {method: scale * np.mean([r.R for r in rs], axis=0) for method, rs in method_runs.items()}
    low, high = (0.0, 100.0) if metric == "accuracy" else (min(R.min() for R in means.values()),
                                                           max(R.max() for R in means.values()))
    fig, axes = plt.subplots(1, len(method_runs), figsize=(3.2 * len(method_runs), 3.8), squeeze=False)
    for ax, (method, R) in zip(axes[0], means.items()):
        ax.imshow(R, vmin=low, vmax=high, cmap="viridis" if metric == "accuracy" else "viridis_r")
        for (i, j), v in np.ndenumerate(R):
            dark = (v - low) < 0.6 * (high - low) if metric == "accuracy" else (v - low) > 0.4 * (high - low)
            ax.text(j, i, f"{v:.0f}" if metric == "accuracy" else f"{v:.2f}", ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")
        T = R.shape[0]
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("evaluated on task")
    axes[0][0].set_ylabel("after training task")
    fig.suptitle(f"{TITLES[scenario]}: {label} R[i][j], mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def accuracy_curves(runs: Sequence[RunResult], path: str) -> None:
    """Per scenario: mean accuracy (text: loss) over the tasks seen so far, after each task (mean ± std)."""
    plt = pyplot()
    grouped = group(runs)
    cols = min(len(grouped), CURVE_COLUMNS)
    rows = -(-len(grouped) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(grouped):]:
        ax.set_visible(False)
    for ax, (scenario, method_runs) in zip(axes.flat, grouped.items()):
        scale, _, ylabel = STYLES[next(iter(method_runs.values()))[0].metric]
        for method, rs in method_runs.items():
            curves = scale * np.array([seen_task_accuracy(r.R) for r in rs])
            x = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(x, mean, marker="o", markersize=3, label=method)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_title(TITLES[scenario], fontsize=10)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[len(grouped) - 1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _layers(importance: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Layer name (parameter name without `.weight`/`.bias`) → all its importance values."""
    layers: dict[str, list[np.ndarray]] = {}
    for name, v in importance.items():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(v.double().flatten().numpy())
    return {k: np.concatenate(v) for k, v in layers.items()}


def importance_histograms(runs: Sequence[RunResult], scenario: str, path: str) -> bool:
    """log10 Ω histograms per layer (rows: methods with importance; first seed's final Ω).

    Returns False (and writes nothing) when no run of the scenario has importance.
    """
    plt = pyplot()
    firsts = [rs[0] for rs in group(runs)[scenario].values() if rs[0].importance]
    if not firsts:
        return False
    names = list(_layers(firsts[0].importance))
    fig, axes = plt.subplots(len(firsts), len(names), figsize=(3.2 * len(names), 2.2 * len(firsts)),
                             squeeze=False)
    for row, r in zip(axes, firsts):
        layers = _layers(r.importance)
        for ax, name in zip(row, names):
            v = layers[name]
            positive = v[v > 0]
            if positive.size:
                ax.hist(np.log10(positive), bins=50, color="tab:blue")
            zeros = 100 * (1 - positive.size / max(1, v.size))
            ax.set_title(f"{r.method} · layer {name} ({zeros:.0f}% zero)", fontsize=8)
            ax.set_xlabel("log10 Ω (EWC: Fisher)" if r.method.startswith("ewc") else "log10 Ω", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{TITLES[scenario]}: importance per layer after the last task (seed {firsts[0].seed})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_plots(runs: Sequence[RunResult], out_dir: str) -> list[str]:
    """All plots for `runs` into `out_dir`; returns the written paths."""
    paths = [os.path.join(out_dir, "accuracy_curves.png")]
    accuracy_curves(runs, paths[0])
    for scenario in group(runs):
        path = os.path.join(out_dir, f"accuracy_matrix_{scenario}.png")
        accuracy_matrices(runs, scenario, path)
        paths.append(path)
        path = os.path.join(out_dir, f"importance_{scenario}.png")
        if importance_histograms(runs, scenario, path):
            paths.append(path)
    return paths
