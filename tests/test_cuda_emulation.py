"""The CUDA kernels' logic without a GPU, against the reference oracle.

``tests/cuda_emulation.cpp`` runs the kernels' per-thread phases on the host (its header says what that
covers: all index math, tiling, bounds, row selection, the gradient formulas; not the CUB block
primitives, the wmma fragment calls or real concurrency). Here the ``spafl::native_*`` ops get CPU kernels
(in place of the ``cpp`` backend's, for this module) that compose those emulated launchers exactly as
``csrc/cuda/bindings.cpp`` composes the real ones, and
the ``cuda`` backend's device check is lifted, so the public API (``sparse_linear``/``sparse_conv2d``
with ``backend="cuda"``), ``ops.py``'s autograd and the backend's Python code run end to end on the CPU.
Outputs start as NaN (indices as -7), so any element a kernel fails to write shows up.
"""

from __future__ import annotations

import functools

import pytest
import torch
from cuda_tools import ConvShape, load_emulation, require_nvcc
from oracle import (
    assert_compiled_matches_eager,
    assert_low_precision_matches_oracle,
    assert_matches_oracle,
    cast,
    controlled_threshold,
    conv_linear_model,
    make_params,
    rows_for_density,
)
from test_conv2d import GEOMETRIES
from test_ties import check_every_consumer, tie_thresholds, tie_weight

import spafl_kernels as sk
from spafl_kernels.backends import get_backend
from spafl_kernels.semantics import STES, Conv2dGeometry, acc_dtype, row_score

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SELECT_ACTIVE = -1
DENSITIES = [0.0, "one", 0.5, 1.0]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _contiguous(t: torch.Tensor | None):
    return None if t is None else t.contiguous()


class EmulatedOps:
    """CPU kernels of the ``spafl::native_*`` ops: ``bindings.cpp``'s steps over the emulated launchers (a
    fresh empty tensor for each gradient not computed, as there: outputs never alias each other)."""

    def __init__(self, lib):
        self.lib = lib

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, f"spafl_emu_{name}")(*args)
        assert status == 0, f"{name} returned cudaError {status}"

    def scores(self, weight, threshold):
        rows = weight.shape[0]
        score = torch.full((rows,), float("nan"), dtype=acc_dtype(weight.dtype))
        fan_in = weight.numel() // rows if rows else 0
        self.call("row_scores", DTYPE_CODES[weight.dtype], _ptr(weight), _ptr(threshold), _ptr(score), rows, fan_in)
        return score

    def select(self, score, dtype, ste: int, complement: bool):
        rows = score.shape[0]
        index = torch.full((rows,), -7, dtype=torch.long)
        count = torch.full((), -7, dtype=torch.long)
        self.call("select_rows", DTYPE_CODES[dtype], _ptr(score), rows, ste, int(complement), _ptr(index), _ptr(count))
        return index, count

    def param_grads(self, score, ste, weight, bias, grad_y, dweight, outer, inner):
        rows = weight.shape[0]
        dbias = None if bias is None else torch.full_like(bias, float("nan"))
        dthreshold = torch.full((rows,), float("nan"), dtype=weight.dtype)
        self.call("param_grads", DTYPE_CODES[weight.dtype], _ptr(score), ste, _ptr(weight), _ptr(bias), _ptr(grad_y),
                  _ptr(dweight), _ptr(dbias), _ptr(dthreshold), rows, weight.numel() // rows if rows else 0,
                  outer, inner)
        return dbias, dthreshold

    # ------------------------------------------------------------------------------------- linear

    def linear_fwd(self, x, weight, bias, threshold):
        x, weight, bias, threshold = (_contiguous(t) for t in (x, weight, bias, threshold))
        score = self.scores(weight, threshold)
        perm, count = self.select(score, weight.dtype, SELECT_ACTIVE, complement=True)
        (M, K), N = x.shape, weight.shape[0]
        y = torch.full((M, N), float("nan"), dtype=x.dtype)
        self.call("linear_fwd", DTYPE_CODES[x.dtype], _ptr(x), _ptr(weight), _ptr(bias), _ptr(perm), _ptr(count),
                  _ptr(y), M, N, K)
        return y, score

    def linear_bwd(self, grad_y, x, weight, bias, score, ste, need_dx, need_params):
        grad_y, x, weight, bias, score = (_contiguous(t) for t in (grad_y, x, weight, bias, score))
        (M, K), N = x.shape, weight.shape[0]
        code = DTYPE_CODES[x.dtype]
        dx = x.new_empty(0)
        if need_dx:
            active, count = self.select(score, x.dtype, SELECT_ACTIVE, complement=False)
            dx = torch.full((M, K), float("nan"), dtype=x.dtype)
            self.call("linear_dx", code, _ptr(grad_y), _ptr(weight), _ptr(active), _ptr(count), _ptr(dx), M, N, K)
        if not need_params:
            return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
        graded, count = self.select(score, x.dtype, ste, complement=False)
        dweight = torch.full_like(weight, float("nan"))
        self.call("linear_dw", code, _ptr(grad_y), _ptr(x), _ptr(graded), _ptr(count), _ptr(dweight), M, N, K)
        dbias, dthreshold = self.param_grads(score, ste, weight, bias, grad_y, dweight, outer=M, inner=1)
        return dx, dweight, (x.new_empty(0) if dbias is None else dbias), dthreshold

    # ------------------------------------------------------------------------------------- conv2d

    @staticmethod
    def conv_shape(x, weight, geometry) -> ConvShape:
        geo = Conv2dGeometry.of(geometry)
        assert geo.groups == 1
        out_h, out_w = geo.output_hw(x.shape[2:], weight.shape[2:])
        return ConvShape(*x.shape, weight.shape[0], *weight.shape[2:], out_h, out_w, *geo.stride, *geo.padding,
                         *geo.dilation)

    def conv2d_fwd(self, x, weight, bias, threshold, geometry):
        x, weight, bias, threshold = (_contiguous(t) for t in (x, weight, bias, threshold))
        shape = self.conv_shape(x, weight, geometry)
        score = self.scores(weight, threshold)
        perm, count = self.select(score, weight.dtype, SELECT_ACTIVE, complement=True)
        y = torch.full((shape.batch, shape.out_channels, shape.out_h, shape.out_w), float("nan"), dtype=x.dtype)
        self.call("conv2d_fwd", DTYPE_CODES[x.dtype], _ptr(x), _ptr(weight), _ptr(bias), _ptr(perm), _ptr(count),
                  _ptr(y), shape)
        return y, score

    def conv2d_bwd(self, grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params):
        grad_y, x, weight, bias, score = (_contiguous(t) for t in (grad_y, x, weight, bias, score))
        shape = self.conv_shape(x, weight, geometry)
        code = DTYPE_CODES[x.dtype]
        dx = x.new_empty(0)
        if need_dx:
            active, count = self.select(score, x.dtype, SELECT_ACTIVE, complement=False)
            dx = torch.full_like(x, float("nan"))
            self.call("conv2d_dx", code, _ptr(grad_y), _ptr(weight), _ptr(active), _ptr(count), _ptr(dx), shape)
        if not need_params:
            return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
        graded, count = self.select(score, x.dtype, ste, complement=False)
        dweight = torch.full_like(weight, float("nan"))
        self.call("conv2d_dw", code, _ptr(grad_y), _ptr(x), _ptr(graded), _ptr(count), _ptr(dweight), shape)
        inner = shape.out_h * shape.out_w
        dbias, dthreshold = self.param_grads(score, ste, weight, bias, grad_y, dweight, shape.batch, inner)
        return dx, dweight, (x.new_empty(0) if dbias is None else dbias), dthreshold


@pytest.fixture(scope="module")
def emulated():
    """The emulated kernels, installed as the CPU kernels of spafl::native_* (overriding the cpp backend's),
    with the cuda backend's device check lifted for the duration of this module."""
    kernels = EmulatedOps(load_emulation(require_nvcc()))
    backend = get_backend("cuda")
    with torch.library._scoped_library("spafl", "IMPL") as library, pytest.MonkeyPatch.context() as patch:
        for op in ("linear_fwd", "linear_bwd", "conv2d_fwd", "conv2d_bwd"):
            library.impl(f"native_{op}", getattr(kernels, op), "CPU")
        patch.setattr(backend, "not_supported_reasons", lambda spec: [])
        yield kernels


# ------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (63, 2, 3, 3), (600, 17), (0, 4)])
def test_row_scores_and_selection(emulated, dtype, shape):
    g = torch.Generator().manual_seed(shape[0])
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = shape[0]
    # (semantics.row_score cannot reshape a weight without rows: the empty case is checked by shape alone.)
    threshold = controlled_threshold(weight, rows // 2, g).to(dtype) if rows else torch.zeros(0, dtype=dtype)
    weight = weight.to(dtype)
    score = emulated.scores(weight, threshold)
    assert score.shape == (rows,) and score.dtype == acc_dtype(dtype)
    if rows:  # the bits of semantics.row_score's definition, not just close to it
        assert torch.equal(score, row_score(weight, threshold))
    for ste_code, ste in [(SELECT_ACTIVE, None), *enumerate(STES)]:
        selected = score > 0
        if ste is not None:
            selected |= sk.semantics.ste_gate(score, ste) != 0
        expected = selected.nonzero().squeeze(1)
        for complement in (False, True):
            index, count = emulated.select(score, dtype, ste_code, complement)
            assert int(count) == expected.numel()
            torch.testing.assert_close(index[: int(count)], expected)
            rest = (~selected).nonzero().squeeze(1) if complement else torch.full((rows - int(count),), -1)
            torch.testing.assert_close(index[int(count):], rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("row_fan_in", [37, 64, 200])
def test_ties_and_one_ulp_either_side(emulated, row_fan_in, dtype):
    """Thresholds at a row's exact score and one ulp either side: the scores' bits, and every consumer."""
    layer = sk.SparseLinear(row_fan_in, 50, backend="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(tie_weight(layer.weight.shape, dtype, seed=row_fan_in))
        threshold, expected = tie_thresholds(layer.weight, seed=row_fan_in + 1)
        layer.threshold.copy_(threshold)
    assert torch.equal(emulated.scores(layer.weight.detach(), threshold), row_score(layer.weight, threshold))
    check_every_consumer(layer, expected, torch.randn(3, row_fan_in).to(dtype))


# ------------------------------------------------------------------------------------------ linear

# (M, in_features, out_features, bias): odd sizes, and one crossing 64-row/column and 16/32-deep tiles.
LINEAR_SHAPES = [(5, 3, 1, True), (4, 33, 7, False), (6, 17, 63, True), (9, 65, 123, True), (70, 130, 150, True)]


def _linear(backend, ste, x, weight, threshold, bias=None):
    return sk.sparse_linear(x, weight, bias, threshold, ste=ste, backend=backend)


def _linear_case(m, k, n, bias, density, seed=0):
    weight, b, threshold = make_params((n, k), rows_for_density(n, density), bias, seed=n + seed)
    x = torch.randn(m, k, dtype=torch.float64, generator=torch.Generator().manual_seed(m + seed))
    return {"x": x, "weight": weight, "threshold": threshold, "bias": b}


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m, k, n, bias", LINEAR_SHAPES)
def test_linear_matches_reference(emulated, ste, density, m, k, n, bias):
    assert_matches_oracle(
        functools.partial(_linear, "cuda", ste), functools.partial(_linear, "reference", ste),
        _linear_case(m, k, n, bias, density),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("m, k, n, bias", [(9, 65, 123, True), (70, 130, 150, False)])
def test_linear_tensor_core_path_matches_reference(emulated, dtype, ste, m, k, n, bias):
    assert_low_precision_matches_oracle(
        functools.partial(_linear, "cuda", ste), functools.partial(_linear, "reference", ste),
        _linear_case(m, k, n, bias, 0.5), dtype,
    )


def test_linear_input_without_grad_and_empty_batch(emulated):
    weight, b, threshold = (t.float() for t in make_params((9, 5), 4, True, seed=3))
    weight.requires_grad_()
    x = torch.randn(3, 5)
    sk.sparse_linear(x, weight, b, threshold, backend="cuda").sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    y = sk.sparse_linear(torch.randn(0, 5), weight, b, threshold, backend="cuda")
    assert y.shape == (0, 9)


# ------------------------------------------------------------------------------------------ conv2d

CONV_GEOMETRIES = {name: g for name, g in GEOMETRIES.items() if g[9] == 1}  # groups == 1
# Crosses 64-pixel/filter tiles in every GEMM (72 output pixels, 70 filters, 242 input pixels).
CONV_GEOMETRIES["tiles"] = (2, 5, 11, 11, 70, (3, 3), 2, 1, 1, 1, True)


def _conv(backend, ste, geometry, x, weight, threshold, bias=None):
    stride, padding, dilation = geometry
    return sk.sparse_conv2d(x, weight, bias, threshold, stride, padding, dilation, ste=ste, backend=backend)


def _conv_case(name, density):
    batch, cin, h, w, cout, kernel, stride, padding, dilation, _, bias = CONV_GEOMETRIES[name]
    weight, b, threshold = make_params((cout, cin, *kernel), rows_for_density(cout, density), bias, seed=cout)
    x = torch.randn(batch, cin, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {"x": x, "weight": weight, "threshold": threshold, "bias": b}, (stride, padding, dilation)


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRIES))
def test_conv2d_matches_reference(emulated, ste, density, geometry):
    tensors, conv_args = _conv_case(geometry, density)
    assert_matches_oracle(
        functools.partial(_conv, "cuda", ste, conv_args), functools.partial(_conv, "reference", ste, conv_args),
        tensors,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", ["stride-pad", "tiles"])
def test_conv2d_tensor_core_path_matches_reference(emulated, dtype, geometry):
    tensors, conv_args = _conv_case(geometry, 0.5)
    assert_low_precision_matches_oracle(
        functools.partial(_conv, "cuda", "identity", conv_args),
        functools.partial(_conv, "reference", "identity", conv_args), tensors, dtype,
    )


# ------------------------------------------------------------------------------ op contract, compile


def opcheck_cuda_ops(device: str) -> None:
    """``opcheck`` of the ``spafl::native_*`` ops on ``device``: schema, fake kernels against the real ones
    (shapes, strides, dtypes, no aliasing between outputs), dispatch. Shared with test_cuda.py."""
    lin = cast(_linear_case(6, 5, 9, True, 0.5), torch.float32, device)
    x, w, b, t = (lin[k] for k in ("x", "weight", "bias", "threshold"))
    y, score = torch.ops.spafl.native_linear_fwd(x, w, b, t)
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.spafl.native_linear_fwd.default, (x, w, b, t))
    for bias, ste, need_dx, need_params in [(b, 1, True, True), (None, 0, False, True), (b, 2, True, False)]:
        args = (g, x, w, bias, score, ste, need_dx, need_params)
        torch.library.opcheck(torch.ops.spafl.native_linear_bwd.default, args)
    conv, _ = _conv_case("stride-pad", 0.5)  # stride 2, padding 1, dilation 1
    x, w, t = (conv[k].to(device, torch.float32) for k in ("x", "weight", "threshold"))
    geometry = [2, 2, 1, 1, 1, 1, 1]  # stride, padding, dilation (h, w), groups
    y, score = torch.ops.spafl.native_conv2d_fwd(x, w, None, t, geometry)
    torch.library.opcheck(torch.ops.spafl.native_conv2d_fwd.default, (x, w, None, t, geometry))
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.spafl.native_conv2d_bwd.default, (g, x, w, None, score, geometry, 2, True, True))


def compile_matches_eager(device: str) -> None:
    """A small conv + linear model on the cuda backend: torch.compile(fullgraph=True) equals eager, values
    and gradients. Shared with test_cuda.py."""
    model = conv_linear_model("cuda", 3, 8, 9, 16, device)
    assert_compiled_matches_eager(model, torch.randn(2, 3, 9, 9, device=device))


def test_opcheck(emulated):
    opcheck_cuda_ops("cpu")


def test_compile_fullgraph_matches_eager(emulated):
    compile_matches_eager("cpu")
