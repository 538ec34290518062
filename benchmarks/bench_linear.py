"""pytest-benchmark: sparse Linear (dense, masked dense and every backend); see conftest.py and suite.py."""

from suite import run_case

OP = "linear"


def test_linear(benchmark, layer, density, ste, mode, candidate):
    run_case(benchmark, layer, density, ste, mode, candidate)
