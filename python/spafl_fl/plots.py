"""PNG plots of runs: accuracy, density, cumulative bits on the wire, and training time per round.

Each figure draws every run given; a run's baselines measured in the same run are drawn dashed in the
same colour: FedAvg's bits for the same architecture, and the ``reference`` (masked dense) time.
"""

from __future__ import annotations

import io
import os

import numpy as np

from .checkpoint import atomic_write_bytes


def plot_runs(runs: list[tuple[str, list[dict]]], out_dir: str) -> list[str]:
    """Write accuracy.png, density.png, bits.png and time.png for ``runs`` (label, metrics records)
    into ``out_dir``; returns their paths."""
    # The object API: no pyplot state and no matplotlib.use, so a notebook's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []

    def figure(name: str, ylabel: str, draw) -> None:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (label, records) in enumerate(runs):
            if records:
                draw(ax, f"C{i}", label, np.array([rec["round"] for rec in records]), records)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        atomic_write_bytes(path, png.getvalue())  # replaces a link at path, never writes through it
        paths.append(path)

    def accuracy(ax, color, label, x, records):
        ax.plot(x, [rec["accuracy"] for rec in records], color=color, label=label)

    def density(ax, color, label, x, records):
        ax.plot(x, [rec["density"]["total"] for rec in records], color=color, label=f"{label}: weight density")
        if all("mean_row_density" in rec for rec in records):
            ax.plot(x, [rec["mean_row_density"] for rec in records], color=color, linestyle=":",
                    label=f"{label}: mean row density")

    def bits(ax, color, label, x, records):
        wire = np.cumsum([rec["uplink_bits"] + rec["downlink_bits"] for rec in records])
        ax.plot(x, wire, color=color, label=f"{label} (up + down)")
        if any(rec["dense_uplink_bits"] != rec["uplink_bits"] for rec in records):
            # FedAvg sends the full state both ways to the sampled clients.
            dense = np.cumsum([2 * rec["dense_uplink_bits"] for rec in records])
            ax.plot(x, dense, color=color, linestyle="--", label=f"{label}: FedAvg, same model")
        ax.set_yscale("log")

    def seconds(ax, color, label, x, records):
        ax.plot(x, [rec["train_seconds"] for rec in records], color=color, label=label)
        if all(rec["baseline_train_seconds"] is not None for rec in records):
            ax.plot(x, [rec["baseline_train_seconds"] for rec in records], color=color, linestyle="--",
                    label=f"{label}: same batches, masked dense")

    figure("accuracy.png", "mean client test accuracy (%)", accuracy)
    figure("density.png", "density (solid: weight; dotted: mean row)", density)
    figure("bits.png", "cumulative bits on the wire", bits)
    figure("time.png", "client training seconds per round", seconds)
    return paths
