"""sparse Conv2d: every kernel backend against the reference oracle, the op contract, compile."""

from __future__ import annotations

import functools

import oracle
import pytest
import torch
import torch.nn.functional as F
from oracle import KERNEL_BACKENDS, assert_matches_oracle, make_params, require_backend, rows_for_density

import spafl_kernels as sk

DENSITIES = [0.0, "one", 0.5, 1.0]

# (batch, in_channels, H, W, out_channels, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = {
    "plain": (2, 3, 7, 6, 7, (3, 3), 1, 0, 1, 1, True),
    "stride-pad": (1, 4, 9, 8, 12, (3, 3), 2, 1, 1, 1, False),
    "same-dilated-even": (2, 2, 6, 7, 5, (2, 4), 1, "same", 2, 1, True),
    "valid-rect": (2, 3, 8, 5, 1, (3, 1), (2, 1), "valid", 1, 1, True),
    "groups": (2, 6, 5, 5, 9, (3, 3), 1, (1, 2), 1, 3, True),
    "depthwise": (1, 4, 6, 6, 8, (3, 3), 1, 1, (2, 1), 4, False),
}


def _conv(backend, ste, geometry, x, weight, threshold, bias=None):
    stride, padding, dilation, groups = geometry
    return sk.sparse_conv2d(x, weight, bias, threshold, stride, padding, dilation, groups, ste=ste, backend=backend)


def _case(name, density, seed=0):
    batch, cin, h, w, cout, kernel, stride, padding, dilation, groups, bias = GEOMETRIES[name]
    n_active = rows_for_density(cout, density)
    weight, b, threshold = make_params((cout, cin // groups, *kernel), n_active, bias, seed=seed + cout)
    x = torch.randn(batch, cin, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "weight": weight, "threshold": threshold, "bias": b}, (stride, padding, dilation, groups)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_matches_reference(backend, ste, density, geometry):
    tensors, conv_args = _case(geometry, density)
    require_backend(backend, "conv2d", groups=conv_args[3])
    assert_matches_oracle(
        functools.partial(_conv, backend, ste, conv_args),
        functools.partial(_conv, "reference", ste, conv_args),
        tensors,
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_channels_last_input(backend):
    require_backend(backend, "conv2d")
    tensors, conv_args = _case("stride-pad", 0.5)
    tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    assert_matches_oracle(
        functools.partial(_conv, backend, "identity", conv_args),
        functools.partial(_conv, "reference", "identity", conv_args),
        tensors,
    )


def test_same_padding_matches_dense_conv():
    """With every row active, 'same' padding (odd total: extra pixel bottom/right) equals F.conv2d's."""
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    weight = torch.randn(4, 3, 2, 4, dtype=torch.float64)
    threshold = torch.full((4,), -1.0, dtype=torch.float64)  # every row active
    for backend in ("reference", "torch"):
        y = sk.sparse_conv2d(x, weight, None, threshold, padding="same", dilation=(1, 3), backend=backend)
        torch.testing.assert_close(y, F.conv2d(x, weight, None, padding="same", dilation=(1, 3)))


def test_pruned_filters_output_exact_zeros():
    tensors, conv_args = _case("plain", 0.5)
    y = _conv("torch", "identity", conv_args, **tensors)
    score = tensors["weight"].abs().mean((1, 2, 3)) - tensors["threshold"]
    assert (y[:, score <= 0] == 0).all() and (y[:, score > 0] != 0).any()


def test_opcheck():
    tensors, _ = _case("groups", 0.5)  # stride 1, padding (1, 2), dilation 1, groups 3
    x, weight, threshold, bias = (tensors[k].float() for k in ("x", "weight", "threshold", "bias"))
    for requires_grad in (False, True):
        args = [t.detach().clone().requires_grad_(requires_grad) for t in (x, weight, bias, threshold)]
        torch.library.opcheck(torch.ops.spafl.conv2d_fwd.default, (*args, [1, 1, 1, 2, 1, 1, 3], 0, "torch"))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sk.SparseConv2d(3, 8, 3, padding=1, backend="torch"), torch.nn.ReLU(inplace=True),
        sk.SparseConv2d(8, 4, 3, stride=2, ste="outer", backend="torch"), torch.nn.Flatten(),
    )
    with torch.no_grad():
        model[0].threshold.copy_(model[0].weight.abs().mean((1, 2, 3)) - torch.linspace(-0.5, 0.5, 8))
    oracle.assert_compiled_matches_eager(model, torch.randn(2, 3, 9, 9))
