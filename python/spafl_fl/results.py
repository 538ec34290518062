"""A finished run read back (summary.json, config.json, metrics.jsonl) and the lines and tables that print what it
saved, for ``spafl-fl run``/``compare`` and ``spafl-fl reproduce``."""

from __future__ import annotations

import os

from .checkpoint import POINTER, read_json_object
from .core import SUMMARY_KEYS
from .rundir import METRICS, read_metrics


def si(value: float | None, unit: str = "") -> str:
    """``value`` in three digits with an SI prefix (``1.23 Mb``); ``-`` for None."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def savings_report(summary: dict, config: dict) -> str:
    """The run's savings in a few lines: accuracy, density, bits vs FedAvg, FLOPs vs dense, time vs masked dense."""
    compute = f"backend {config['resolved_backend']}" if config.get("resolved_backend") else "dense layers"
    lines = [f"{summary['algorithm']} on {config['dataset']} with {config['model']}: {summary['rounds']} rounds, "
             f"{config['clients']} clients ({config['sample']} per round), {compute}"]
    if summary["accuracy"] is None:
        return lines[0] + "\n  (no rounds run)"
    lines.append(f"  accuracy        {summary['accuracy']:.2f} % (mean of the clients' own test splits)")
    lines.append(f"  density         {summary['density']:.3f} weight density (fraction of sparse-layer weights in "
                 "active rows)")
    if summary.get("mean_row_density") is not None:
        lines.append(f"                  {summary['mean_row_density']:.3f} mean row density (mean over layers of the "
                     "fraction of active rows: the authors' 'density')")
    wire = summary["uplink_bits"] + summary["downlink_bits"]
    fedavg = 2 * summary["dense_uplink_bits"]  # FedAvg: the full state down to and up from each sampled client
    bits = f"  bits on wire    up {si(summary['uplink_bits'], 'b')} + down {si(summary['downlink_bits'], 'b')}"
    if summary["algorithm"] != "fedavg" and wire:
        bits += f" vs FedAvg (same model and rounds) {si(fedavg, 'b')}: {fedavg / wire:.3g}x fewer"
    lines.append(bits)
    lines.append(f"  train FLOPs     executed {si(summary['train_flops'])} vs dense "
                 f"{si(summary['dense_train_flops'])} ({summary['train_flops'] / summary['dense_train_flops']:.3f}x);"
                 " paper formula "
                 f"{si(summary['paper_train_flops'])}")
    if summary.get("authors_flops_per_client"):
        lines.append(f"  authors' FLOPs  {si(summary['authors_flops_per_client'])} per client (their count: 1 per "
                     "multiply-add, end-of-round density for the whole round, averaged over all clients)")
    base = summary["baseline_train_seconds"]
    time_line = f"  train time      {summary['train_seconds']:.2f} s"
    if base:
        speedup = base / summary["train_seconds"]
        verdict = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        time_line += f" vs {base:.2f} s masked dense (reference) on the same batches: {verdict} (measured)"
    lines.append(time_line)
    return "\n".join(lines)


def load_run(folder: str) -> tuple[dict, dict, list[dict]]:
    """summary.json, config.json and the metrics records of a finished run; ``ValueError`` naming the
    folder or file when it is missing, unfinished or damaged."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a run folder (no such folder)")
    paths = {name: os.path.join(folder, name) for name in ("config.json", METRICS, "summary.json")}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        unfinished = "summary.json" in missing and os.path.isfile(os.path.join(folder, POINTER))
        hint = "; it is unfinished: continue it with spafl-fl run ... --resume" if unfinished else ""
        raise ValueError(f"{folder} is not a finished run: missing {', '.join(missing)}{hint}")
    summary = read_json_object(paths["summary.json"], SUMMARY_KEYS)
    numbers = [k for k in SUMMARY_KEYS if k != "algorithm" and not (
        summary[k] is None and k in ("accuracy", "density", "baseline_train_seconds")) and not (
        isinstance(summary[k], (int, float)) and not isinstance(summary[k], bool))]
    if numbers:
        raise ValueError(f"{paths['summary.json']} is damaged: {numbers} are not numbers")
    config = read_json_object(paths["config.json"], ("dataset", "model", "clients", "sample"))
    return summary, config, read_metrics(paths[METRICS])


def compare_table(runs: list[tuple[str, dict, dict]]) -> str:
    """One row per run (folder, summary, config)."""
    header = ["run", "algorithm", "backend", "data/model", "rounds", "acc %", "density", "row density",
              "wire bits", "FedAvg bits", "train FLOPs", "dense FLOPs", "authors FLOPs/client", "train s",
              "masked-dense s"]
    rows = [header]
    for folder, s, c in runs:
        rows.append([
            folder, s["algorithm"], str(c.get("resolved_backend") or "dense"), f"{c['dataset']}/{c['model']}",
            str(s["rounds"]), "-" if s["accuracy"] is None else f"{s['accuracy']:.2f}",
            "-" if s["density"] is None else f"{s['density']:.3f}",
            "-" if s.get("mean_row_density") is None else f"{s['mean_row_density']:.3f}",
            si(s["uplink_bits"] + s["downlink_bits"]), si(2 * s["dense_uplink_bits"]),
            si(s["train_flops"]), si(s["dense_train_flops"]), si(s.get("authors_flops_per_client")),
            f"{s['train_seconds']:.2f}",
            "-" if s["baseline_train_seconds"] is None else f"{s['baseline_train_seconds']:.2f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
