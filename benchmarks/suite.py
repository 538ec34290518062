"""The body of every pytest-benchmark case (bench_linear.py, bench_conv2d.py)."""

from __future__ import annotations

import torch

from spafl_kernels.bench import layers


def run_case(benchmark, layer: str, density: float, ste: str, mode: str, candidate: str) -> None:
    """Time one forward (+ backward) of ``candidate`` with pytest-benchmark; record the case."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = layers.make_case(layer, density, ste, device=device)
    step = layers.make_step(case, candidate, train=mode == "fwd+bwd")
    if device == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    benchmark.extra_info.update({
        "layer": layer, "density": density, "active": case.active, "ste": ste, "mode": mode,
        "candidate": candidate, "threads": torch.get_num_threads(),
        "ideal": case.ideal_train if mode == "fwd+bwd" else case.ideal_forward,
    })
    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
