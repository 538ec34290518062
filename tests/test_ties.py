"""Ties: a threshold exactly at a row's mean ``|w|``, and one ulp either side of it.

``semantics.row_score`` defines the score's bits (its summation order and rounding); every backend's
kernels compute those same bits, and every consumer of the mask (the forward pass, ``mask()``, ``density()``,
``sk.density``, ``reset_collapsed``, ``FlopCounter``) calls ``row_score``, so a tie prunes the same rows
everywhere. The inputs: random rows of several widths (one lane chunk, several, a partial tail) with the
threshold at ``row_score`` itself (the exact tie) or one ulp below or above it (``torch.nextafter``), and
thresholds from PyTorch's own ``w.abs().mean(1)`` (ties that other summation orders round either way).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import require_backend
from torch import nn

import spafl_kernels as sk
from spafl_kernels.backends import get_backend
from spafl_kernels.flops import FlopCounter, row_counts
from spafl_kernels.ops import kernels_of
from spafl_kernels.semantics import acc_dtype, fan_in, row_score, score_lanes

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Rows of one partial lane chunk, exactly the float32 lanes, several chunks plus a tail.
FAN_INS = [37, 64, 200]


def tie_weight(shape, dtype, seed: int) -> torch.Tensor:
    """Random rows; in bfloat16 each row is one magnitude with random signs, so that its float32 mean is a
    bfloat16 number and the threshold can sit exactly on it."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype == torch.bfloat16:
        magnitude = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5
        weight = weight.sign() * magnitude.view(-1, *[1] * (len(shape) - 1))
    return weight.to(dtype)


def tie_thresholds(weight: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(threshold [N], expected mask [N] bool)``: per row the exact tie (pruned: ``s = 0``), one ulp below it
    (active) or one ulp above it (pruned), in the weight's dtype."""
    rows = weight.shape[0]
    tie = row_score(weight, torch.zeros(rows, dtype=weight.dtype)).to(weight.dtype)
    assert torch.equal(tie.to(acc_dtype(weight.dtype)), row_score(weight, torch.zeros_like(tie))), "tie not exact"
    offset = torch.randint(-1, 2, (rows,), generator=torch.Generator().manual_seed(seed))
    offset[:3] = torch.tensor([-1, 0, 1])[:rows]  # each case at least once
    below, above = torch.nextafter(tie, tie.new_tensor(-1.0)), torch.nextafter(tie, tie.new_tensor(float("inf")))
    threshold = torch.where(offset < 0, below, torch.where(offset > 0, above, tie))
    return threshold, offset < 0


def _layer(op: str, rows: int, row_fan_in: int, backend: str, dtype) -> nn.Module:
    if op == "linear":
        return sk.SparseLinear(row_fan_in, rows, backend=backend, dtype=dtype)
    assert row_fan_in % 4 == 0 or row_fan_in == 37
    channels, kernel = (row_fan_in // 4, (2, 2)) if row_fan_in % 4 == 0 else (1, (1, 37))
    return sk.SparseConv2d(channels, rows, kernel, backend=backend, dtype=dtype)


def _input(layer: nn.Module, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=g).to(dtype)
    return torch.randn(2, layer.in_channels, layer.kernel_size[0] + 1, layer.kernel_size[1], generator=g).to(dtype)


def check_every_consumer(layer: nn.Module, expected: torch.Tensor, x: torch.Tensor) -> None:
    """The forward pass's live output rows, ``mask()``, ``density()``, ``sk.density``, ``reset_collapsed``
    and ``FlopCounter`` all see the rows ``expected`` ([N] bool) marks active."""
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.bias.uniform_(0.5, 1.0)  # an active row's output is never exactly 0
    with FlopCounter(model) as counter:
        y = model(x)
    dims = [d for d in range(y.dim()) if d != (1 if y.dim() == 4 else y.dim() - 1)]
    live_rows = (y != 0).sum(dims) > 0
    assert torch.equal(live_rows, expected), "forward output rows"
    assert torch.equal(layer.mask().bool(), expected), "mask()"
    density = expected.double().mean().item()
    assert layer.density() == density and sk.density(model)["0"] == density
    assert row_counts(layer)[0] == int(expected.sum())
    assert counter.per_layer["0"].forward == 2 * (y.numel() // y.shape[1 if y.dim() == 4 else -1]) * fan_in(
        layer.weight) * int(expected.sum()), "FlopCounter"
    if density:
        assert sk.reset_collapsed(model, min_density=density - 1e-3) == [], "reset_collapsed"
    assert sk.reset_collapsed(model, min_density=density) == ["0"], "reset_collapsed"
    assert not layer.threshold.any()


BACKENDS = list(sk.BACKEND_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("row_fan_in", FAN_INS)
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_one_ulp_either_side(backend, op, row_fan_in, dtype):
    if dtype not in get_backend(backend).dtypes:
        pytest.skip(f"{backend} does not serve {dtype} (it says so instead of computing)")
    if backend != "reference":
        require_backend(backend, op, dtype=dtype)
    layer = _layer(op, 50, row_fan_in, backend, dtype)
    with torch.no_grad():
        layer.weight.copy_(tie_weight(layer.weight.shape, dtype, seed=row_fan_in))
        threshold, expected = tie_thresholds(layer.weight, seed=row_fan_in + 1)
        layer.threshold.copy_(threshold)
    assert 0 < int(expected.sum()) < 50
    if backend != "reference":
        kernels, args = kernels_of(backend), (layer.weight.detach(), None, layer.threshold.detach())
        x = _input(layer, dtype, 0)
        _, got = kernels.linear_fwd(x, *args) if op == "linear" else kernels.conv2d_fwd(x, *args, [1, 1, 0, 0, 1, 1, 1])
        assert torch.equal(got, row_score(layer.weight, layer.threshold)), "kernel scores differ in bits"
    check_every_consumer(layer, expected, _input(layer, dtype, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_at_torch_mean_prunes_alike_everywhere(backend, dtype):
    """The reported case: thresholds from ``w.abs().mean(1)``, which rounds like ``row_score`` on some rows
    and not on others; whatever ``row_score`` says, every consumer says too."""
    if backend != "reference":
        require_backend(backend, "linear", dtype=dtype)
    torch.manual_seed(0)
    w = torch.randn(1000, 37, dtype=dtype)
    layer = sk.SparseLinear(37, 1000, backend=backend, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.threshold.copy_(w.abs().mean(1))
    expected = row_score(layer.weight, layer.threshold) > 0
    check_every_consumer(layer, expected, torch.randn(2, 37, dtype=dtype))


def defined_score(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``row_score``'s documented steps (lanes, fold, division) as a plain scalar loop: ``[N, ...]``, ``[N]`` ->
    ``[N]`` in the accumulation dtype."""
    acc = acc_dtype(weight.dtype)
    lanes, n = score_lanes(acc), fan_in(weight)
    rows = weight.reshape(weight.shape[0], n).to(acc)
    expected = []
    for i in range(weight.shape[0]):
        lane = [torch.zeros((), dtype=acc) for _ in range(lanes)]
        for j in range(n):
            lane[j % lanes] = lane[j % lanes] + rows[i, j].abs()
        width = lanes
        while width > 1:
            width //= 2
            lane = [lane[k] + lane[k + width] for k in range(width)]
        expected.append(lane[0] / max(n, 1) - threshold[i].to(acc))
    return torch.stack(expected) if expected else torch.zeros(0, dtype=acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 1), (7, 3), (4, 64), (3, 65), (6, 2, 3, 3), (2, 1000), (0, 5), (0, 0), (3, 0)])
def test_row_score_is_its_definition(shape, dtype):
    """``row_score`` against a plain scalar loop of its documented steps (lanes, fold, division)."""
    weight = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    threshold = torch.randn(shape[0], dtype=torch.float64).to(dtype)
    got = row_score(weight, threshold)
    assert got.dtype == acc_dtype(dtype) and got.shape == (shape[0],)
    assert torch.equal(got, defined_score(weight, threshold))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 4),
    trailing=st.lists(st.integers(1, 9), min_size=1, max_size=3).filter(lambda dims: math.prod(dims) <= 300),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["contiguous", "transposed", "channels_last"]),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_score_bits_on_odd_shapes(rows, trailing, dtype, layout, scale, grad, seed):
    """Odd widths (a partial chunk, several chunks plus a tail), tiny and huge magnitudes (sums that overflow
    to inf in 16-bit), strided weights, with and without autograd: the bits of the scalar definition."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, *trailing, generator=g, dtype=torch.float64) * scale).to(dtype)
    threshold = torch.randn(rows, generator=g, dtype=torch.float64).to(dtype)
    if layout == "transposed" and weight.dim() == 2:
        weight = weight.t().contiguous().t()
    elif layout == "channels_last" and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    expected = defined_score(weight, threshold)
    weight.requires_grad_(grad)
    assert torch.equal(row_score(weight, threshold), expected)


def test_row_score_gradient():
    """``ds/dW = sign(W) / n`` and ``ds/dtau = -1``: what the reference backend differentiates."""
    weight = torch.randn(4, 70, dtype=torch.float64, requires_grad=True)
    threshold = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, dtype=torch.float64)
    dw, dt = torch.autograd.grad(row_score(weight, threshold), (weight, threshold), g)
    torch.testing.assert_close(dw, g[:, None] * weight.sign() / 70)
    torch.testing.assert_close(dt, -g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_score_gradient_bits_and_non_finite_rows(dtype):
    """The gradient in bits, as autograd gives it for ``abs().sum(dtype=acc) / n`` (the cast back to the weight's
    dtype included); a row holding an infinity or a NaN passes no gradient to its weights; a threshold alone
    asks for its gradient; the gradient is itself differentiable (a hessian-vector product runs)."""
    weight = torch.randn(5, 3, 7, dtype=torch.float64).to(dtype)
    weight[1, 0, 2], weight[3, 2, 6] = float("inf"), float("nan")
    weight.requires_grad_(True)
    threshold = torch.randn(5, dtype=torch.float64).to(dtype).requires_grad_(True)
    g = torch.randn(5, dtype=torch.float32)
    dw, dt = torch.autograd.grad(row_score(weight, threshold), (weight, threshold), g, create_graph=True)
    finite = torch.tensor([1.0, 0, 1, 0, 1])
    expected = ((g * finite) / 21).to(dtype)[:, None, None] * weight.detach().sgn()
    assert torch.equal(dw, expected) and torch.equal(dt, (-g).to(dtype))
    (dg,) = torch.autograd.grad((dw.float() * torch.randn(5, 3, 7)).sum(), threshold, allow_unused=True)
    assert dg is None or not dg.any()
    (only_tau,) = torch.autograd.grad(row_score(weight.detach(), threshold), threshold, g)
    assert torch.equal(only_tau, (-g).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_filters_sum_in_row_major_order(backend):
    """A channels_last filter is stored (kh, kw, c); its score still sums in the row-major (c, kh, kw) order
    (triton summed the stored order: another rounding at a tie)."""
    if backend != "reference":
        require_backend(backend, "conv2d")
    layer = sk.SparseConv2d(9, 40, 3, backend=backend)
    with torch.no_grad():
        layer.weight.copy_(tie_weight(layer.weight.shape, torch.float32, seed=5))
        threshold, expected = tie_thresholds(layer.weight, seed=6)
        layer.threshold.copy_(threshold)
    layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last)
    if backend != "reference":
        _, got = kernels_of(backend).conv2d_fwd(torch.randn(1, 9, 3, 3), layer.weight.detach(), None,
                                                layer.threshold.detach(), [1, 1, 0, 0, 1, 1, 1])
        assert torch.equal(got, row_score(layer.weight, layer.threshold))
    check_every_consumer(layer, expected, torch.randn(2, 9, 4, 3))
