"""Side by side: the authors' loop (``benchmarks/authors_fmnist.py``) against ``spafl-fl run`` folders.

    python benchmarks/compare_authors.py --out benchmarks/results/authors-fmnist \\
        authors=runs/authors ours=runs/ours "ours, their split=runs/ours-split" local=runs/local

Each ``LABEL=DIR`` names a folder with a ``metrics.jsonl`` (either tool's). Writes ``OUT/results.json``
(per run: accuracy and mean row density per round, and their means over the windows below),
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
    results = {}
    for label, records in runs:
        results[label] = {
            "rounds": len(records),
            "accuracy": [r["accuracy"] for r in records],
            "mean_row_density": [r.get("mean_row_density") for r in records],
            "windows": {f"{a}-{b}": {"accuracy": window_mean(records, "accuracy", a, b),
                                     "mean_row_density": window_mean(records, "mean_row_density", a, b)}
                        for a, b in WINDOWS},
        }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    def cell(w: dict) -> str:
        if w["accuracy"] is None:
            return "-"
        dens = w["mean_row_density"]
        return f"{w['accuracy']:.1f} %" + ("" if dens is None or dens == 1.0 else f" / {dens:.3f}")

    lines = ["| rounds | " + " | ".join(label for label, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for a, b in WINDOWS:
        lines.append(f"| {a}-{b} | " + " | ".join(cell(results[label]["windows"][f"{a}-{b}"]) for label, _ in runs)
                     + " |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, name, ylabel in (("accuracy", "accuracy.png", "mean client accuracy (%)"),
                              ("mean_row_density", "density.png", "mean row density")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (label, records) in enumerate(runs):
            values = [r.get(key) for r in records]
            if all(v is None or v == 1.0 for v in values) and key == "mean_row_density":
                continue  # a dense run
            ax.plot([r["round"] for r in records], values, color=f"C{i}", label=label, lw=1.2)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
