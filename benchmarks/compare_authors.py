"""Side by side: the authors' loop (``benchmarks/authors_fmnist.py``) against ``spafl-fl run`` folders.

    python benchmarks/compare_authors.py --out benchmarks/results/authors-fmnist \\
        authors=runs/authors ours=runs/ours "ours, their split=runs/ours-split" local=runs/local

Each ``LABEL=DIR`` names a folder with a ``metrics.jsonl`` (either tool's). Writes ``OUT/results.json``
(per run: accuracy and mean row density per round, and their means over the windows below),
``OUT/layers.md`` (each pruned layer's row density at the end of each window),
``OUT/table.md`` and ``OUT/accuracy.png`` / ``OUT/density.png`` (per round, every run). A run that has
not reached a window shows "-" there (runs may be unfinished: their rounds are what was measured).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

WINDOWS = "1-3,28-30,40-42,98-100"
"""The rounds whose means the tables give (``--windows``)."""


def parse_windows(text: str) -> list[tuple[int, int]]:
    """``"1-3,28-30"`` -> ``[(1, 3), (28, 30)]``; SystemExit naming a malformed or empty window."""
    windows = []
    for item in text.split(","):
        first, _, last = item.strip().partition("-")
        if not (first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
            raise SystemExit(f"--windows: {item!r} is not FIRST-LAST with 1 <= FIRST <= LAST")
        windows.append((int(first), int(last)))
    return windows


def read(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def window_mean(records: list[dict], key: str, first: int, last: int) -> float | None:
    values = [r[key] for r in records if first <= r["round"] <= last and r.get(key) is not None]
    return float(np.mean(values)) if len(values) == last - first + 1 else None


def pruned_layers(runs: list[tuple[str, list[dict]]]) -> list[str]:
    """Every layer that some run prunes (the union of the per-layer densities recorded), in record order."""
    names: dict[str, None] = {}
    for _, records in runs:
        for r in records[:1]:
            names.update((k, None) for k in r.get("density", {}) if k != "total")
    return list(names)


def weight_share(record: dict, weights: dict[str, int]) -> float | None:
    """Fraction of the weights of ``weights``' layers (name -> weight count) in active rows, a layer this
    run keeps dense counting whole; None without per-layer densities."""
    dens = record.get("density")
    if not weights or not isinstance(dens, dict) or not any(k in dens for k in weights):
        return None
    return sum(n * dens.get(k, 1.0) for k, n in weights.items()) / sum(weights.values())


def authors_count(record: dict, layers: list[str]) -> float | None:
    """Mean row density over ``layers`` as the authors count it (every masked layer of their model), a
    layer this run keeps dense counting 1.0; None for a run without per-layer densities (FedAvg, Local)."""
    dens = record.get("density")
    if not isinstance(dens, dict) or not any(k in dens for k in layers):
        return None
    return float(np.mean([dens.get(k, 1.0) for k in layers]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--windows", default=WINDOWS, metavar="A-B,...",
                   help=f"the rounds whose means the tables give (default {WINDOWS})")
    p.add_argument("--layers", default="", metavar="NAME,...",
                   help="the layers the mean row density is over, a run's dense layer counting 1 (default: every "
                   "layer some run prunes)")
    p.add_argument("--layer-weights", default="conv1=500,conv2=25000,fc3=400000,fc4=5000", metavar="NAME=N,...",
                   help="weights per layer for the weight density (default: LeNet-5 on 28x28 inputs); '' for none")
    args = p.parse_args()
    windows = parse_windows(args.windows)
    weights = {k: int(v) for k, _, v in (item.partition("=") for item in args.layer_weights.split(",") if item)}
    runs = []
    for item in args.runs:
        label, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"{item!r}: expected LABEL=DIR")
        runs.append((label, read(folder)))
    os.makedirs(args.out, exist_ok=True)
    layers = [name for name in args.layers.split(",") if name] or pruned_layers(runs)
    for _, records in runs:
        for r in records:
            r["authors_row_density"] = authors_count(r, layers)
            r["weight_share"] = weight_share(r, weights)
    results = {"layers": layers}
    for label, records in runs:
        results[label] = {
            "rounds": len(records),
            "accuracy": [r["accuracy"] for r in records],
            "mean_row_density": [r.get("mean_row_density") for r in records],
            "authors_row_density": [r["authors_row_density"] for r in records],
            "weight_density": [r["weight_share"] for r in records],
            "windows": {f"{a}-{b}": {key: window_mean(records, key, a, b)
                                     for key in ("accuracy", "mean_row_density", "authors_row_density",
                                                 "weight_share")}
                        for a, b in windows},
        }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    def accuracy_cell(w: dict) -> str:
        return "-" if w["accuracy"] is None else f"{w['accuracy']:.1f} %"

    def row_cell(w: dict) -> str:
        dens, counted = w["mean_row_density"], w["authors_row_density"]
        if w["accuracy"] is None or counted is None:
            return "-"
        return f"{counted:.3f}" + ("" if abs(dens - counted) < 5e-4 else f" ({dens:.3f})")

    def weight_cell(w: dict) -> str:
        return "-" if w["accuracy"] is None or w["weight_share"] is None else f"{w['weight_share']:.3f}"

    header = ["| rounds | " + " | ".join(label for label, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    lines = []
    for title, cell in (("Accuracy (mean of the clients' own test splits)", accuracy_cell),
                        ("Mean row density over every layer of their model, a layer kept dense counting 1 "
                         "(in parentheses: over the run's pruned layers only)", row_cell),
                        ("Weight density: the fraction of those layers' weights in active rows", weight_cell)):
        lines += [f"**{title}**, means of the rounds named", "", *header]
        lines += [f"| {a}-{b} | " + " | ".join(cell(results[label]["windows"][f"{a}-{b}"]) for label, _ in runs)
                  + " |" for a, b in windows]
        lines.append("")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    def layer_cell(records: list[dict], last: int) -> str:
        dens = next((r.get("density") for r in records if r["round"] == last), None)
        if not isinstance(dens, dict) or not any(k in dens for k in layers):
            return "-"
        return " / ".join("dense" if k not in dens else f"{dens[k]:.2f}" for k in layers)

    layer_lines = [f"Row density per layer ({' / '.join(layers)}) after the round named", "",
                   "| round | " + " | ".join(label for label, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    layer_lines += [f"| {b} | " + " | ".join(layer_cell(records, b) for _, records in runs) + " |" for _, b in windows]
    with open(os.path.join(args.out, "layers.md"), "w") as f:
        f.write("\n".join(layer_lines) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for key, name, ylabel in (("accuracy", "accuracy.png", "mean client accuracy (%)"),
                              ("authors_row_density", "density.png",
                               "mean row density (every layer of their model; dense = 1)")):
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (label, records) in enumerate(runs):
            values = [r.get(key) for r in records]
            if all(v is None for v in values):
                continue  # a run without pruned layers
            ax.plot([r["round"] for r in records], values, color=f"C{i}", label=label, lw=1.2)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=110)


if __name__ == "__main__":
    main()
