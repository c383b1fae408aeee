"""Bar charts of benchmark results: one PNG beside each results JSON, every row's speed
relative to the baseline of its group (measured in the same run), on a log scale.

    python benchmarks/plot.py [results/*.json ...]     # default: every file in results/

`python -m mas_fast bench` calls it after the run.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence

from mas_fast.cl.plots import pyplot

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def speedups(doc: dict) -> dict[str, dict[str, float]]:
    """group → {row name: baseline seconds / row seconds} for every non-baseline row."""
    out: dict[str, dict[str, float]] = {}
    for r in doc["rows"]:
        if not r.get("baseline") and r.get("ratio_to_baseline"):
            out.setdefault(r["group"], {})[r["name"]] = 1.0 / r["ratio_to_baseline"]
    return out


def plot(path: str) -> str:
    """Writes `path` with .png for .json; returns the PNG's path."""
    with open(path) as f:
        doc = json.load(f)
    groups = speedups(doc)
    baselines = sorted({r["name"] for r in doc["rows"] if r.get("baseline")})
    names = sorted({n for g in groups.values() for n in g})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.35 * max(1, len(groups) * len(names))))
    height = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [g + i * height for g in range(len(groups))]
        ax.barh(ys, [rows.get(name, 0.0) for rows in groups.values()], height, label=name)
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], list(groups))
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"speed relative to the group's baseline ({', '.join(baselines)}); > 1 is faster")
    ax.set_title(f"{doc['suite']} — {doc['device']}, torch {doc['torch']}, {doc['date']}")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(paths: Sequence[str] = ()) -> list[str]:
    return [plot(p) for p in (paths or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))))]


if __name__ == "__main__":
    for png in main(sys.argv[1:]):
        print(png)
