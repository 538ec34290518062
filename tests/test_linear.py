"""sparse Linear: every kernel backend against the reference oracle, the op contract, compile."""

from __future__ import annotations

import functools

import oracle
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


def _params(out_features=9, in_features=5, density=0.5, bias=True, seed=3):
    weight, b, threshold = make_params((out_features, in_features), rows_for_density(out_features, density), bias, seed)
    return weight.float(), (None if b is None else b.float()), threshold.float()


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_every_row_pruned_gives_zeros_and_backward_works(backend):
    require_backend(backend, "linear")
    weight, bias, threshold = (t.requires_grad_() for t in _params(density=0.0))
    x = torch.randn(4, 5, requires_grad=True)
    y = sk.sparse_linear(x, weight, bias, threshold, backend=backend)
    assert y.shape == (4, 9) and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and (bias.grad == 0).all()
    assert threshold.grad.abs().sum() > 0  # identity STE: pruned rows still learn their threshold


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_one_dimensional_and_batched_inputs(backend):
    require_backend(backend, "linear")
    weight, bias, threshold = _params()
    for shape in [(5,), (2, 3, 5), (0, 5)]:
        x = torch.randn(shape)
        y = sk.sparse_linear(x, weight, bias, threshold, backend=backend)
        expected = sk.sparse_linear(x, weight, bias, threshold, backend="reference")
        assert y.shape == (*shape[:-1], 9)
        torch.testing.assert_close(y, expected)


def test_input_without_grad_skips_dx():
    weight, bias, threshold = (t.requires_grad_() for t in _params())
    x = torch.randn(3, 5)
    sk.sparse_linear(x, weight, bias, threshold, backend="torch").sum().backward()
    assert x.grad is None and weight.grad is not None and threshold.grad is not None


def test_opcheck():
    weight, bias, threshold = _params()
    x = torch.randn(6, 5)
    for requires_grad in (False, True):
        for b in (bias, None):
            args = [None if t is None else t.detach().clone().requires_grad_(requires_grad)
                    for t in (x, weight, b, threshold)]
            torch.library.opcheck(torch.ops.spafl.linear_fwd.default, (*args, 1, "torch"))  # ste 1: outer


@pytest.mark.parametrize("need_dx, need_params", [(True, False), (False, True), (True, True)])
def test_backward_opcheck(need_dx, need_params):
    weight, bias, threshold = _params()
    x, grad_y = torch.randn(6, 5), torch.randn(6, 9)
    _, score = torch.ops.spafl.linear_fwd(x, weight, bias, threshold, 0, "torch")
    for b in (bias, None):
        torch.library.opcheck(
            torch.ops.spafl.linear_bwd.default,
            (grad_y, x, weight, b, score, 0, need_dx, need_params, "torch"),
        )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sk.SparseLinear(6, 16, backend="torch"), torch.nn.ReLU(), sk.SparseLinear(16, 3, ste="clipped")
    )
    with torch.no_grad():
        model[0].threshold.copy_(model[0].weight.abs().mean(1) - torch.linspace(-0.5, 0.5, 16))
    oracle.assert_compiled_matches_eager(model, torch.randn(4, 6), backend=compiler)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_in_place_op_on_output_keeps_backward_valid(backend):
    """Backward saves no output, so an in-place ReLU right after the layer is legal (as after nn.Linear)."""
    require_backend(backend, "linear")
    weight, bias, threshold = _params()
    x = torch.randn(4, 5)
    grads = []
    for inplace in (False, True):
        leaves = [t.clone().requires_grad_() for t in (weight, bias, threshold)]
        y = sk.sparse_linear(x, leaves[0], leaves[1], leaves[2], backend=backend)
        torch.nn.functional.relu(y, inplace=inplace).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
