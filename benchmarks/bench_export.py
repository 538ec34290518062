"""Inference latency of the exported model (``export_dense``) against the dense model and the sparse model.

    python benchmarks/bench_export.py --threads 2 --reps 21 --demo out/demo \\
        --json benchmarks/results/export-cpu-2threads.json --markdown benchmarks/results/export-cpu-2threads.md

For each of the paper's four models at densities 0.5 and 0.1 (random rows per layer, BatchNorm statistics
randomised so that a pruned channel's constant is not 0, as in a trained model) and, with ``--demo RUN_DIR``,
for the client of median weight density in that run's last checkpoint: eval-mode forward under ``no_grad`` at
batch 1 and 64 of ``dense`` (the same weights, nothing pruned), ``sparse`` (this package's layers, backend
``auto``) and ``exported``, timed round-robin (interleaved), reporting the median and the 20th/80th percentile
of the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
from torch import nn

from spafl_kernels import density, export_dense_with_report
from spafl_kernels.bench.models import SETUPS, set_densities
from spafl_kernels.bench.records import machine
from spafl_kernels.bench.timing import time_interleaved
from spafl_kernels.zoo import build_model

MODELS = ("lenet5", "conv4", "resnet18", "vit")
BATCHES = (1, 64)


def time_candidates(calls: dict, reps: int) -> dict[str, dict]:
    """Median, p20 and p80 seconds per call of each candidate, sampled round-robin (``time_interleaved``)."""
    timings = time_interleaved(calls, reps, warmup=1, min_sample_s=0.02)
    return {name: {"median": t["p50"], "p20": t["p20"], "p80": t["p80"]} for name, t in timings.items()}


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2), (m.bias, -1, 1)):
                    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)


def dense_twin(sparse: nn.Module, name: str, input_shape, num_classes: int) -> nn.Module:
    dense = build_model(name, input_shape, num_classes, sparse=False)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.endswith("threshold")})
    return dense.eval()


def cases(demo: str | None):
    """``(label, model name, density label, sparse model, dense model, inputs [64, C, H, W])``."""
    for name in MODELS:
        setup = SETUPS[name]
        for d in (0.5, 0.1):
            sparse = build_model(name, setup.input_shape, setup.num_classes, seed=0)
            set_densities(sparse, d)
            randomise_batchnorm(sparse)
            x = torch.randn(64, *setup.input_shape, generator=torch.Generator().manual_seed(1))
            yield name, name, f"{d}", sparse.eval(), dense_twin(sparse, name, setup.input_shape, setup.num_classes), x
    if demo:
        from spafl_fl.exporting import load_client_models

        clients = json.load(open(os.path.join(demo, "config.json")))["clients"]
        models, datas, config = load_client_models(demo, list(range(clients)))
        ranked = sorted((density(m)["total"], k) for k, m in enumerate(models))
        weight_density, k = ranked[len(ranked) // 2]
        model, data = models[k], datas[k]
        x = data.x_test.repeat((64 + len(data.x_test) - 1) // len(data.x_test), 1, 1, 1)[:64]
        dense = dense_twin(model, config.model, tuple(data.x_test.shape[1:]), int(model(x[:1]).shape[1]))
        yield f"demo client {k}", config.model, f"{weight_density:.3f}", model, dense, x


def run(reps: int, demo: str | None) -> list[dict]:
    rows = []
    for label, name, dens, sparse, dense, x in cases(demo):
        exported, report = export_dense_with_report(sparse, x[:2])
        params = {"dense": report.params_before, "sparse": report.params_before, "exported": report.params_after}
        for batch in BATCHES:
            inputs = x[:batch].contiguous()
            with torch.no_grad():
                calls = {c: (lambda m=m, inputs=inputs: m(inputs)) for c, m in
                         (("dense", dense), ("sparse", sparse), ("exported", exported))}
                timed = time_candidates(calls, reps)
            for candidate, t in timed.items():
                rows.append({"case": label, "model": name, "density": dens, "batch": batch, "candidate": candidate,
                             "median_ms": 1e3 * t["median"], "p20_ms": 1e3 * t["p20"], "p80_ms": 1e3 * t["p80"],
                             "vs_dense": timed["dense"]["median"] / t["median"], "params": params[candidate],
                             "flops_ratio": report.flops_after / report.flops_before if candidate == "exported"
                             else 1.0})
            print(f"{label} d={dens} b={batch}: " + ", ".join(
                f"{c} {1e3 * t['median']:.3f} ms" for c, t in timed.items()), flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    load = meta["load_average"]
    lines = ["# Inference latency of exported models", "", f"`{meta['command']}`", "",
             f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}; eval-mode forward under no_grad; "
             f"median (p20-p80) of {meta['reps']} interleaved repetitions, ms. The machine ({os.cpu_count()} cores) "
             f"had a 1-minute load average of {load[0]} at the start and {load[1]} at the end (above the core count, "
             "other jobs inflated the times: compare within a row). `density`: fraction of active rows per layer "
             "(demo: the client's weight density after the last round). `params`: exported/dense. "
             "`x dense`: t_dense / t.", "",
             "| model | density | batch | dense ms | sparse ms | exported ms | sparse x dense | exported x dense | "
             "exported x sparse | params | FLOPs |", "|" + "---|" * 11]
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["density"], r["batch"]), {})[r["candidate"]] = r
    for (case, dens, batch), c in by.items():
        fmt = lambda r: f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"  # noqa: E731
        e, s, d = c["exported"], c["sparse"], c["dense"]
        lines.append(f"| {case} | {dens} | {batch} | {fmt(d)} | {fmt(s)} | {fmt(e)} | {s['vs_dense']:.2f}x | "
                     f"{e['vs_dense']:.2f}x | {s['median_ms'] / e['median_ms']:.2f}x | "
                     f"{e['params'] / d['params']:.3f} | {e['flops_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--demo", metavar="RUN_DIR", help="also the median-density client of this spafl-fl run")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = run(args.reps, args.demo)
    meta = {"command": shlex.join(["python", "benchmarks/bench_export.py", *(sys.argv[1:] if argv is None else argv)]),
            "reps": args.reps, "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], **machine()}
    text = markdown(rows, meta)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
