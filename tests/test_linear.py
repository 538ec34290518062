"""sparse Linear: every kernel backend against the reference oracle, the op contract, compile."""

from __future__ import annotations

import functools

import pytest
import torch
from oracle import KERNEL_BACKENDS, assert_matches_oracle, make_params, require_backend, rows_for_density

import spafl_kernels as sk

DENSITIES = [0.0, "one", 0.5, 1.0]


def _linear(backend, ste, x, weight, threshold, bias=None):
    return sk.sparse_linear(x, weight, bias, threshold, ste=ste, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(
    "lead, in_features, out_features, bias",
    [((5,), 3, 1, True), ((4,), 33, 7, False), ((2, 3), 17, 63, True), ((9,), 65, 123, True)],
)
def test_matches_reference(backend, ste, density, lead, in_features, out_features, bias):
    require_backend(backend, "linear")
    n_active = rows_for_density(out_features, density)
    weight, b, threshold = make_params((out_features, in_features), n_active, bias, seed=out_features)
    x = torch.randn(*lead, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": b}
    assert_matches_oracle(
        functools.partial(_linear, backend, ste), functools.partial(_linear, "reference", ste), tensors
    )
