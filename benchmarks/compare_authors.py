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

WINDOWS = ((1, 3), (28, 30), (40, 42), (98, 100))


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
    args = p.parse_args()
    runs = []
    for item in args.runs:
        label, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"{item!r}: expected LABEL=DIR")
        runs.append((label, read(folder)))
    os.makedirs(args.out, exist_ok=True)
    layers = pruned_layers(runs)
    for _, records in runs:
        for r in records:
            r["authors_row_density"] = authors_count(r, layers)
    results = {"layers": layers}
    for label, records in runs:
        results[label] = {
            "rounds": len(records),
            "accuracy": [r["accuracy"] for r in records],
            "mean_row_density": [r.get("mean_row_density") for r in records],
            "authors_row_density": [r["authors_row_density"] for r in records],
            "windows": {f"{a}-{b}": {key: window_mean(records, key, a, b)
                                     for key in ("accuracy", "mean_row_density", "authors_row_density")}
                        for a, b in WINDOWS},
        }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    def cell(w: dict) -> str:
        if w["accuracy"] is None:
            return "-"
        dens, counted = w["mean_row_density"], w["authors_row_density"]
        if dens is None or dens == 1.0 or counted is None:
            return f"{w['accuracy']:.1f} %"
        own = "" if abs(dens - counted) < 5e-4 else f" ({dens:.3f} over its pruned layers)"
        return f"{w['accuracy']:.1f} % / {counted:.3f}{own}"

    lines = ["| rounds | " + " | ".join(label for label, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for a, b in WINDOWS:
        lines.append(f"| {a}-{b} | " + " | ".join(cell(results[label]["windows"][f"{a}-{b}"]) for label, _ in runs)
                     + " |")
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
    layer_lines += [f"| {b} | " + " | ".join(layer_cell(records, b) for _, records in runs) + " |" for _, b in WINDOWS]
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
