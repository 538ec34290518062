"""pytest-benchmark: sparse Conv2d (dense, masked dense and every backend); see conftest.py and suite.py."""

from suite import run_case

OP = "conv2d"


def test_conv2d(benchmark, layer, density, ste, mode, candidate):
    run_case(benchmark, layer, density, ste, mode, candidate)
