"""Layer benchmark: sparse backends against dense and masked-dense, side by side in one run.

``python -m spafl_kernels.bench --help``. Every candidate is timed interleaved with the others
(round-robin over repetitions, medians), so drift on a shared machine hits them alike. The figure of
merit is the fraction of ideal (DESIGN §5): ``(t_dense / t_sparse) / ideal_speedup``, where the
ideal speedup is the ratio of dense to skipping FLOPs (``flops.layer_flops``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flops import layer_flops
from .functional import sparse_conv2d, sparse_linear
from .semantics import fan_in

# name -> (op, input shape, weight shape, conv kwargs)
LAYERS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], dict]] = {
    "linear-large": ("linear", (256, 4096), (4096, 4096), {}),
    "conv-large": ("conv2d", (64, 64, 32, 32), (128, 64, 3, 3), {"padding": 1}),
    "lenet5-fc1": ("linear", (64, 400), (120, 400), {}),
    "lenet5-conv2": ("conv2d", (64, 6, 14, 14), (16, 6, 5, 5), {}),
}
BASELINES = ("dense", "masked")  # plain PyTorch op; the paper's masked dense (= reference backend)


@dataclass
class Case:
    """One benchmarked layer at one density: inputs, and the FLOP-based ideal speedup."""

    layer: str
    density: float
    ste: str
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    threshold: torch.Tensor
    ideal_forward: float
    ideal_train: float


def make_case(layer: str, density: float, ste: str, dtype=torch.float32, device="cpu", seed=0) -> Case:
    """Inputs with ``round(density * rows)`` active rows; pruned rows get scores in (-1, 0), i.e.
    gate closed under ``outer``, open under ``identity``/``clipped``."""
    op, x_shape, w_shape, _ = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).to(device, dtype)
    weight = (torch.randn(w_shape, generator=g) / fan_in(torch.empty(w_shape, device="meta")) ** 0.5)
    rows = w_shape[0]
    active = round(density * rows)
    score = -torch.rand(rows, generator=g) * 0.5 - 0.25
    score[torch.randperm(rows, generator=g)[:active]] = 0.5
    threshold = weight.abs().reshape(rows, -1).mean(1) - score
    positions = x_shape[0] if op == "linear" else x_shape[0] * x_shape[2] * x_shape[3]
    open_pruned = 0 if ste == "outer" else rows - active
    flops = layer_flops(positions, fan_in(weight), rows, active, open_pruned, need_dx=True)
    return Case(
        layer, density, ste, x, weight.to(device, dtype), torch.zeros(rows, device=device, dtype=dtype),
        threshold.to(device, dtype),
        ideal_forward=flops.dense_forward / max(flops.forward, 1),
        ideal_train=flops.dense_train / max(flops.train, 1),
    )


def make_step(case: Case, candidate: str, train: bool) -> Callable[[], None]:
    """A no-argument function running one forward (and backward when ``train``) of ``candidate``:
    ``dense``, ``masked`` or a backend name."""
    op, _, _, conv_kwargs = LAYERS[case.layer]
    params = (case.weight, case.bias, case.threshold)
    weight, bias, threshold = (t.detach().clone().requires_grad_(train) for t in params)
    x = case.x.detach().clone().requires_grad_(train)
    backend = "reference" if candidate == "masked" else candidate

    def forward():
        if op == "linear":
            if candidate == "dense":
                return F.linear(x, weight, bias)
            return sparse_linear(x, weight, bias, threshold, ste=case.ste, backend=backend)
        if candidate == "dense":
            return F.conv2d(x, weight, bias, **conv_kwargs)
        return sparse_conv2d(x, weight, bias, threshold, ste=case.ste, backend=backend, **conv_kwargs)

    grad = torch.ones_like(forward()) if train else None

    def step():
        if train:
            forward().backward(grad)
        else:
            with torch.no_grad():
                forward()

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each step, timed round-robin so that drift hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(layer: str, densities, candidates, ste: str, train: bool, reps: int) -> list[dict]:
    """One row per (density, candidate): median seconds, speedup over dense, fraction of ideal."""
    rows = []
    for density in densities:
        case = make_case(layer, density, ste)
        steps = {name: make_step(case, name, train) for name in ("dense", *candidates)}
        medians = time_interleaved(steps, reps)
        ideal = case.ideal_train if train else case.ideal_forward
        for name in candidates:
            speedup = medians["dense"] / medians[name]
            rows.append({
                "layer": layer, "density": density, "backend": name, "ste": ste,
                "mode": "fwd+bwd" if train else "fwd", "seconds": medians[name],
                "dense_seconds": medians["dense"], "speedup": speedup, "ideal": ideal,
                "fraction_of_ideal": speedup / ideal,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'layer':<14}{'mode':<9}{'density':>8}  {'backend':<10}{'median ms':>10}"
              f"{'vs dense':>10}{'ideal':>8}{'of ideal':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['layer']:<14}{r['mode']:<9}{r['density']:>8.2f}  {r['backend']:<10}{r['seconds'] * 1e3:>10.2f}"
            f"{r['speedup']:>9.2f}x{r['ideal']:>7.2f}x{r['fraction_of_ideal']:>10.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m spafl_kernels.bench",
        description="Time sparse layers against dense (plain PyTorch op) and masked dense (the paper's "
        "code), interleaved, and print median time, speedup over dense and fraction of ideal.",
    )
    parser.add_argument("--layer", choices=sorted(LAYERS), default="linear-large")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                        help="fractions of active rows (default: 1 0.5 0.25 0.1)")
    parser.add_argument("--backends", nargs="+", default=["masked", "torch"],
                        help="candidates besides dense: 'masked' and backend names (default: masked torch)")
    parser.add_argument("--ste", default="identity", help="straight-through estimator (default: identity)")
    parser.add_argument("--forward-only", action="store_true", help="time the forward pass alone")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per candidate (default: 7)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: all)")
    args = parser.parse_args(argv)
    for density in args.densities:
        if not 0.0 <= density <= 1.0:
            parser.error(f"densities must lie in [0, 1], got {density}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.reps} reps, medians")
    rows = run(args.layer, args.densities, args.backends, args.ste, not args.forward_only, args.reps)
    print(format_table(rows))


if __name__ == "__main__":
    main()
