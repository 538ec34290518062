"""pytest-benchmark: whole training steps of the paper's models (dense, masked dense, static and every
backend). The interleaved table with speed-ups and fractions of the static limit comes from
``spafl-bench --models`` (spafl_kernels/bench/models.py), which builds the same candidates.
Default: lenet5 and mlp at densities 1 and 0.1; ``--bench-full``: every model and density."""

from __future__ import annotations

import torch

from spafl_kernels.bench import layers, models
from spafl_kernels.bench.models import MODELS, SETUPS, candidate_models, training_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "model" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--bench-full")
    metafunc.parametrize("model", MODELS if full else ["lenet5", "mlp"])
    metafunc.parametrize("density", models.DENSITIES if full else [1.0, 0.1])
    metafunc.parametrize("candidate", ["dense", "static", *layers.default_candidates(DEVICE)])


def test_training_step(benchmark, model, density, candidate):
    models, _, (x, target) = candidate_models(model, density, [c for c in [candidate] if c not in ("dense", "static")],
                                              DEVICE)
    inner = training_step(models[candidate], x, target)

    def step():
        inner()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"model": model, "density": density, "candidate": candidate,
                                 "ste": SETUPS[model].ste, "batch": SETUPS[model].batch,
                                 "threads": torch.get_num_threads()})
    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
