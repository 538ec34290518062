"""The cpp backend's two exact paths against each other and against dense and masked dense, per layer.

    python benchmarks/paths_ab.py --threads 2 --reps 7 --blocks 3 --json out.json --markdown out.md

For the layers of the authors' FMNIST LeNet-5 (20 and 50 filters, fc 800 -> 500 -> 10, batch 64) and the
paper-model layers of ``spafl-bench`` named by ``--layers``: forward and forward+backward (identity STE, as
their FMNIST code), at each density, times ``dense`` (plain PyTorch op), ``masked`` (the paper's masked
dense: ``spafl_kernels.bench.masked``) and ``cpp`` with ``SPAFL_CPU_PATH`` = ``skip``, ``dense`` and ``auto`` (the
timed choice, which every call of ``auto`` replays after its first sight), all interleaved in one process
(``spafl_kernels.bench.timing.time_interleaved``; ``--blocks`` such runs, median of their medians with min-max).
``--clock thread --threads 1`` times the calling thread's CPU time instead of wall time, for a machine whose cores
are oversubscribed (the time the thread waits for a core is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from spafl_kernels import paths
from spafl_kernels.bench import layers, records, timing

AUTHORS = {
    "authors-conv1": layers.Layer("conv2d", (64, 1, 28, 28), (20, 1, 5, 5), "authors-lenet5"),
    "authors-conv2": layers.Layer("conv2d", (64, 20, 12, 12), (50, 20, 5, 5), "authors-lenet5"),
    "authors-fc3": layers.Layer("linear", (64, 800), (500, 800), "authors-lenet5"),
    "authors-fc4": layers.Layer("linear", (64, 500), (10, 500), "authors-lenet5"),
    # LeNet-5 fc1 and conv1 at batch 32 (unpadded conv1), as measured against the paper's small layers
    "lenet5-fc1-b32": layers.Layer("linear", (32, 400), (120, 400), "lenet5"),
    "lenet5-conv1-b32": layers.Layer("conv2d", (32, 1, 28, 28), (6, 1, 5, 5), "lenet5"),
}
CANDIDATES = ("dense", "masked", "skip", "dense-path", "auto")


def _pinned(step, path):
    def run():
        os.environ["SPAFL_CPU_PATH"] = path
        step()

    return run


def measure(layer: str, density: float, train: bool, reps: int, blocks: int, clock=time.perf_counter) -> dict:
    case = layers.make_case(layer, density, "identity")
    cpp = layers.make_step(case, "cpp", train)
    steps = {"dense": layers.make_step(case, "dense", train), "masked": layers.make_step(case, "masked", train),
             "skip": _pinned(cpp, "skip"), "dense-path": _pinned(cpp, "dense"), "auto": _pinned(cpp, "auto")}
    runs = [timing.medians(timing.time_interleaved(steps, reps, clock=clock)) for _ in range(blocks)]
    os.environ.pop("SPAFL_CPU_PATH", None)
    spec = layers.LAYERS[layer]
    row = {"layer": layer, "mode": "fwd+bwd" if train else "fwd", "density": density, "active": case.active,
           "rows": spec.w_shape[0], "auto_path": paths.used_paths(spec.op, spec.x_shape, spec.w_shape, case.active)}
    for name in CANDIDATES:
        values = [r[name] for r in runs]
        row[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    row["auto_vs_dense"] = row["dense"]["median_s"] / row["auto"]["median_s"]
    row["auto_vs_masked"] = row["masked"]["median_s"] / row["auto"]["median_s"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}`", "", records.provenance(meta["machine"]), "",
             f"Median us per call (min-max over {meta['blocks']} interleaved runs of {meta['reps']} reps), "
             f"{meta['threads']} threads, {meta['clock']} clock, identity STE; speedups of `cpp` auto over dense and "
             "masked dense.", "",
             "| layer | mode | density | active | dense | masked | cpp skip | cpp dense | cpp auto | auto path "
             "| vs dense | vs masked |", "|" + "---|" * 12]
    for r in rows:
        cells = [f"{r[n]['median_s'] * 1e6:.0f} ({r[n]['min_s'] * 1e6:.0f}-{r[n]['max_s'] * 1e6:.0f})"
                 for n in CANDIDATES]
        lines.append(f"| {r['layer']} | {r['mode']} | {r['density']:.2f} | {r['active']}/{r['rows']} | "
                     + " | ".join(cells) + f" | {r['auto_path']} | {r['auto_vs_dense']:.2f}x | "
                     f"{r['auto_vs_masked']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=[*AUTHORS, "lenet5-conv1", "lenet5-fc1", "vit-mlp1"])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: the calling thread's CPU time (a loaded machine; needs --threads 1)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread times the calling thread only: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    layers.LAYERS.update(AUTHORS)
    rows = []
    for layer in args.layers:
        for mode in args.modes:
            for density in args.densities:
                rows.append(measure(layer, density, mode == "fwd+bwd", args.reps, args.blocks, clock))
                r = rows[-1]
                print(f"{layer:<14} {mode:<8} {density:.2f} dense {r['dense']['median_s'] * 1e6:8.0f} us  "
                      f"masked {r['masked']['median_s'] * 1e6:8.0f}  skip {r['skip']['median_s'] * 1e6:8.0f}  "
                      f"dense-path {r['dense-path']['median_s'] * 1e6:8.0f}  auto {r['auto']['median_s'] * 1e6:8.0f} "
                      f"({r['auto_path']})  {r['auto_vs_dense']:.2f}x dense, {r['auto_vs_masked']:.2f}x masked",
                      flush=True)
    meta = {"command": "python benchmarks/paths_ab.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "threads": args.threads, "reps": args.reps, "blocks": args.blocks, "clock": args.clock,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "machine": records.machine()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
