"""pytest-benchmark suites of the sparse ops: ``pytest benchmarks/bench_linear.py benchmarks/bench_conv2d.py``.

Each benchmark times one candidate alone (pytest-benchmark's statistics and JSON); the interleaved
table with speedups and fractions of ideal comes from ``spafl-bench``, which builds the same cases
(spafl_kernels/bench/layers.py). ``--bench-full``: every layer, density and STE of ``spafl-bench``; default:
its ``--quick`` subset.
"""

from __future__ import annotations

import torch

from spafl_kernels.bench import layers as bench_layers


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="every layer, density and STE (default: the spafl-bench --quick subset)")


def pytest_generate_tests(metafunc):
    """Parametrises ``layer``, ``density``, ``ste``, ``mode`` and ``candidate`` for the module's ``OP``."""
    if "layer" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--bench-full")
    layers = [n for n, layer in bench_layers.LAYERS.items() if layer.op == metafunc.module.OP]
    if not full:
        layers = [n for n in layers if n in bench_layers.QUICK["layers"]]
    metafunc.parametrize("layer", layers)
    metafunc.parametrize("density", bench_layers.DENSITIES if full else bench_layers.QUICK["densities"])
    metafunc.parametrize("ste", ["outer", "identity"] if full else bench_layers.QUICK["stes"])
    metafunc.parametrize("mode", bench_layers.MODES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metafunc.parametrize("candidate", ["dense", *bench_layers.default_candidates(device)])
