"""The ``cpp`` backend's own checks: the fused score op, the paths its kernels take (runs of
consecutive rows, gathered chunks, outputs on fresh zero pages, groups), its ops' contract, its dispatch."""

from __future__ import annotations

import functools

import pytest
import torch
from oracle import (
    assert_matches_oracle,
    controlled_threshold,
    make_params,
    outputs_and_grads,
    require_backend,
    rows_for_density,
)

import spafl_kernels as sk
from spafl_kernels import _ext
from spafl_kernels.backends import get_backend, resolve_backend
from spafl_kernels.backends.base import CallSpec

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason=f"extension not built: {_ext.EXTENSION_ERROR}")


def threshold_for_rows(weight: torch.Tensor, active: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A threshold making exactly the rows ``active`` (bool ``[N]``) active, scores as in
    ``oracle.controlled_threshold`` (0.2 away from the mask and gate edges, both gate states present)."""
    g = torch.Generator().manual_seed(seed)
    threshold = controlled_threshold(weight, int(active.sum()), g)
    mean_abs = weight.detach().double().reshape(weight.shape[0], -1).abs().mean(1)
    magnitude = (mean_abs - threshold.double()).abs()
    score = torch.where(active, magnitude, -magnitude)
    return (mean_abs - score).to(weight.dtype)


# ------------------------------------------------------------------------------------ linear


def _linear(backend, ste, x, weight, threshold, bias=None):
    return sk.sparse_linear(x, weight, bias, threshold, ste=ste, backend=backend)


# (batch, in_features, out_features). "wide": rows of 32768 float64 (256 KiB), so a gathered panel
# holds 64 of them and 200 rows exercise every path: runs used in place, chunks gathered and flushed,
# dW on fresh zero pages. "tall": 300 batch rows, so the gathered grad columns of a chunk need more dW
# rows as scratch than a nearly full chunk has gaps (the buffer fallback).
_SHAPES = {"wide": (3, 32768, 200), "tall": (300, 4096, 600)}
_PATTERNS = {
    "long run": lambda n: torch.arange(n) < 150,
    "run and scattered": lambda n: (torch.arange(n) >= 30) & (torch.arange(n) < 110) | (torch.arange(n) % 7 == 0),
    "every other": lambda n: torch.arange(n) % 2 == 0,
    "all but one": lambda n: torch.arange(n) != 77,
    "all but every 50th": lambda n: torch.arange(n) % 50 != 49,
}


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("pattern", sorted(_PATTERNS))
@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_linear_row_patterns(ste, pattern, shape):
    require_backend("cpp", "linear")
    batch, in_features, out_features = _SHAPES[shape]
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(out_features, generator=g, dtype=torch.float64)
    threshold = threshold_for_rows(weight, _PATTERNS[pattern](out_features))
    x = torch.randn(batch, in_features, generator=g, dtype=torch.float64)
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": bias}
    assert_matches_oracle(functools.partial(_linear, "cpp", ste), functools.partial(_linear, "reference", ste), tensors)


@pytest.mark.parametrize("need_dx, need_params", [(True, False), (False, True)])
def test_linear_partial_gradients(need_dx, need_params):
    """Only the gradients asked for are computed; the rest come back empty."""
    require_backend("cpp", "linear")
    weight, bias, threshold = (t.float() for t in make_params((9, 5), 4, True, seed=1))
    x = torch.randn(6, 5)
    y, score = torch.ops.spafl.native_linear_fwd(x, weight, bias, threshold)
    grads = torch.ops.spafl.native_linear_bwd(torch.ones_like(y), x, weight, bias, score, 0, need_dx, need_params)
    assert [t.numel() > 0 for t in grads] == [need_dx, need_params, need_params, need_params]


# ------------------------------------------------------------------------------------ conv2d


def _conv(backend, ste, geometry, x, weight, threshold, bias=None):
    return sk.sparse_conv2d(x, weight, bias, threshold, **geometry, ste=ste, backend=backend)


_GEOMETRIES = [
    # (x shape, weight shape, geometry)
    ((2, 6, 9, 11), (5, 6, 3, 2), {}),
    ((2, 6, 9, 11), (7, 6, 3, 3), {"stride": 2, "padding": 1}),
    ((1, 4, 12, 10), (6, 4, 3, 3), {"stride": (1, 2), "padding": (2, 1), "dilation": 2}),
    ((2, 6, 8, 8), (9, 2, 3, 3), {"padding": "same", "groups": 3}),
    ((2, 4, 7, 7), (4, 1, 3, 3), {"padding": 1, "groups": 4}),  # depthwise
    ((2, 3, 10, 10), (8, 3, 2, 2), {"padding": "same"}),  # even kernel: asymmetric 'same' padding
    # One input channel: dW by oneDNN or im2col + batched GEMM, whichever is timed faster per shape
    # (conv2d.cpp single_channel_dw; test_single_channel_weight_gradient_settings pins each).
    ((3, 1, 12, 11), (20, 1, 5, 5), {}),  # LeNet-5's conv1
    ((2, 1, 11, 13), (24, 1, 3, 3), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ((2, 2, 9, 9), (32, 1, 3, 3), {"padding": 1, "groups": 2}),  # one channel per group
]


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("density", [0.0, "one", 0.5, 1.0])
@pytest.mark.parametrize("case", range(len(_GEOMETRIES)))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_reference(ste, density, case, bias):
    x_shape, w_shape, geometry = _GEOMETRIES[case]
    require_backend("cpp", "conv2d", groups=geometry.get("groups", 1))
    weight, b, threshold = make_params(w_shape, rows_for_density(w_shape[0], density), bias, seed=case)
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": b}
    assert_matches_oracle(
        functools.partial(_conv, "cpp", ste, geometry), functools.partial(_conv, "reference", ste, geometry), tensors
    )


@pytest.mark.parametrize("setting", ["auto", "onednn", "im2col"])
def test_single_channel_weight_gradient_settings(monkeypatch, setting):
    """Both algorithms for the weight gradient of a one-channel convolution (oneDNN, im2col + GEMM; by
    default the faster, timed per shape on first sight, or the one SPAFL_CPU_CONV_DW pins) match the
    reference, x without a gradient (a first layer), on the shape's first call and later ones."""
    require_backend("cpp", "conv2d")
    monkeypatch.setenv("SPAFL_CPU_CONV_DW", setting)
    weight, bias, threshold = make_params((20, 1, 5, 5), 19, True, seed=3)
    # A batch no other test uses: the first of the two cpp calls is this shape's first sight.
    x = torch.randn(7, 1, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for backend in ("reference", "cpp", "cpp"):
        w, b, t = (p.clone().requires_grad_() for p in (weight, bias, threshold))
        sk.sparse_conv2d(x, w, b, t, padding=2, backend=backend).sin().sum().backward()
        grads.append((w.grad, b.grad, t.grad))
    for call in grads[1:]:
        for got, expected in zip(call, grads[0]):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("ste", ["identity", "outer"])
@pytest.mark.parametrize("every", [3, -4])
def test_conv2d_large_output(ste, every):
    """An output of 2 MiB or more comes from freshly mapped pages; pruned planes must still read as 0.
    ``every=3``: every third filter active; ``-4``: all but every fourth, so that the backward runs in
    batch chunks (more than half of the filters active)."""
    require_backend("cpp", "conv2d")
    g = torch.Generator().manual_seed(5)
    # Many filters, few positions: the output is large, the per-filter reductions stay short enough
    # that float32 roundings of the oneDNN backward on a compact filter set stay near the oracle's.
    weight = torch.randn(256, 4, 3, 3, generator=g, dtype=torch.float64) * 0.5
    threshold = threshold_for_rows(weight, torch.arange(256) % 3 == 1 if every == 3 else torch.arange(256) % 4 != 3)
    x = torch.randn(2, 4, 32, 32, generator=g, dtype=torch.float64)
    tensors = {"x": x, "weight": weight, "threshold": threshold, "bias": torch.randn(256, generator=g).double()}
    geometry = {"padding": 1}
    assert_matches_oracle(
        functools.partial(_conv, "cpp", ste, geometry), functools.partial(_conv, "reference", ste, geometry), tensors
    )


# ------------------------------------------------------------------------------ op contract


def _op_samples():
    weight, bias, threshold = (t.float() for t in make_params((6, 5), 3, True, seed=4))
    x = torch.randn(4, 5)
    y, score = torch.ops.spafl.native_linear_fwd(x, weight, bias, threshold)
    yield torch.ops.spafl.native_linear_fwd.default, (x, weight, bias, threshold)
    yield torch.ops.spafl.native_linear_bwd.default, (torch.randn_like(y), x, weight, bias, score, 2, True, True)
    cw, cb, ct = (t.float() for t in make_params((4, 3, 3, 3), 2, True, seed=5))
    cx = torch.randn(2, 3, 6, 6)
    geometry = [1, 1, 1, 1, 1, 1, 1]  # stride, padding, dilation (h, w), groups
    cy, cscore = torch.ops.spafl.native_conv2d_fwd(cx, cw, cb, ct, geometry)
    yield torch.ops.spafl.native_conv2d_fwd.default, (cx, cw, cb, ct, geometry)
    grad = torch.randn_like(cy)
    yield torch.ops.spafl.native_conv2d_bwd.default, (grad, cx, cw, cb, cscore, geometry, 0, True, True)
    # The autograd nodes (csrc/autograd.cpp), with a weight that requires grad.
    yield torch.ops.spafl.native_linear.default, (x, weight.requires_grad_(), bias, threshold, 1)
    yield torch.ops.spafl.native_conv2d.default, (cx, cw.requires_grad_(), None, ct, geometry, 0)


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(sample):
    """Schemas, fake kernels and dispatch of the C++ ops agree (torch.library.opcheck); the autograd
    nodes also pass its autograd-registration and AOT-dispatch checks."""
    op, args = list(_op_samples())[sample]
    full = op in (torch.ops.spafl.native_linear.default, torch.ops.spafl.native_conv2d.default)
    torch.library.opcheck(op, args, **({} if full else {"test_utils": ("test_schema", "test_faketensor")}))


# The eager path: one C++ autograd node per call (csrc/autograd.cpp). Its input edges exist for the
# tensors only, bias only when given, so which gradients it computes depends on both.
_GRAD_SUBSETS = {
    "x": ("x",), "weight": ("weight",), "bias": ("bias",), "threshold": ("threshold",),
    "params": ("weight", "bias", "threshold"), "all": ("x", "weight", "bias", "threshold"), "none": (),
}


@pytest.mark.parametrize("subset", sorted(_GRAD_SUBSETS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("op", ["linear", "conv2d", "conv2d_1ch"])
def test_autograd_node_gradients_asked_for(op, bias, subset):
    """Only the tensors that require grad get one, and each equals the reference's; ``none``: y has no
    grad_fn. Checks the node's edge bookkeeping against the oracle for every subset."""
    require_backend("cpp", "conv2d" if op.startswith("conv2d") else op)
    # conv2d_1ch: one input channel, 20 filters (LeNet-5's conv1): the timed one-channel dW path.
    shape = {"linear": (7, 5), "conv2d": (6, 3, 3, 3), "conv2d_1ch": (20, 1, 5, 5)}[op]
    weight, b, threshold = (t.double() for t in make_params(shape, 16 if op == "conv2d_1ch" else 3, True, seed=2))
    x = {"linear": torch.randn(4, 5), "conv2d": torch.randn(2, 3, 7, 7), "conv2d_1ch": torch.randn(3, 1, 9, 9)}[op]
    tensors = {"x": x.double(), "weight": weight, "bias": b if bias else None, "threshold": threshold}
    results = {}
    for backend in ("cpp", "reference"):
        leaves = {k: None if v is None else v.clone().requires_grad_(k in _GRAD_SUBSETS[subset])
                  for k, v in tensors.items()}
        if op == "linear":
            y = sk.sparse_linear(**leaves, ste="identity", backend=backend)
        else:
            y = sk.sparse_conv2d(**leaves, padding=1, ste="identity", backend=backend)
        if y.requires_grad:
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        results[backend] = (y, {k: None if v is None else v.grad for k, v in leaves.items()})
    (y, grads), (y_ref, grads_ref) = results["cpp"], results["reference"]
    torch.testing.assert_close(y.detach(), y_ref.detach())
    assert y.requires_grad == bool(set(_GRAD_SUBSETS[subset]) - ({"bias"} if not bias else set()))
    for key, expected in grads_ref.items():
        assert (grads[key] is None) == (expected is None), key
        if expected is not None:
            torch.testing.assert_close(grads[key], expected, msg=key)


# --------------------------------------------------------------------------------- dispatch


def test_auto_picks_cpp_on_cpu():
    assert resolve_backend("auto", "linear", "cpu", torch.float32, 1) == "cpp"
    assert resolve_backend("auto", "conv2d", "cpu", torch.float64, 2) == "cpp"
    # bfloat16 is not served by cpp: auto falls through to torch.
    assert resolve_backend("auto", "linear", "cpu", torch.bfloat16, 1) == "torch"


def test_not_supported_reasons():
    backend = get_backend("cpp")
    assert backend.not_supported_reasons(CallSpec("linear", "cpu", torch.float32)) == []
    reasons = backend.not_supported_reasons(CallSpec("conv2d", "cuda", torch.float16))
    assert any("runs on cpu tensors only, not cuda" in r for r in reasons) and any("float16" in r for r in reasons)
    with pytest.raises(sk.BackendNotSupportedError, match=r"dtype float16 is not supported \(float32, float64\)"):
        sk.sparse_linear(torch.randn(2, 3).half(), torch.randn(4, 3).half(), None, torch.zeros(4).half(), backend="cpp")


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_compile_matches_eager(op):
    """Under torch.compile the layers trace the spafl ops (fake kernels, registered autograd); eager
    calls take the equivalent autograd.Function. Both give the same outputs and gradients."""
    require_backend("cpp", op)
    shape = (7, 5) if op == "linear" else (6, 3, 3, 3)
    weight, bias, threshold = (t.float() for t in make_params(shape, 3, True, seed=6))
    x = torch.randn(4, 5) if op == "linear" else torch.randn(2, 3, 8, 8)

    def layer(x, weight, bias, threshold):
        if op == "linear":
            return sk.sparse_linear(x, weight, bias, threshold, ste="clipped", backend="cpp")
        return sk.sparse_conv2d(x, weight, bias, threshold, padding=1, ste="clipped", backend="cpp")

    tensors = {"x": x, "weight": weight, "bias": bias, "threshold": threshold}
    eager = outputs_and_grads(layer, tensors)
    compiled = outputs_and_grads(torch.compile(layer, fullgraph=True, backend="aot_eager"), tensors)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, msg=key)
