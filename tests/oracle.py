"""Test helpers: inputs with controlled scores, and comparison against the ``reference`` oracle.

Tolerance (docs/DESIGN.md §6, flash-attention's rule): a backend's float32 error against the float64 oracle
must be at most twice the float32 oracle's own error against it, plus a small absolute slack.
"""

from __future__ import annotations

import os

import pytest
import torch

import spafl_kernels as sk
from spafl_kernels.backends import get_backend
from spafl_kernels.backends.base import CallSpec

KERNEL_BACKENDS = [name for name in sk.BACKEND_NAMES if name != "reference"]


def require_backend(name: str, op: str, device: str = "cpu", dtype=torch.float32, groups: int = 1):
    """Skip unless ``name`` can run; listed in ``SPAFL_REQUIRE_BACKENDS`` (comma-separated), fail
    instead, so that CI cannot pass by skipping a backend it was meant to test."""
    reasons = get_backend(name).not_supported_reasons(CallSpec(op, device, dtype, groups))
    if reasons:
        required = os.environ.get("SPAFL_REQUIRE_BACKENDS", "").split(",")
        message = f"backend {name!r} cannot run {op} here: " + "; ".join(reasons)
        if name in required:
            pytest.fail(message)
        pytest.skip(message)


def rows_for_density(n_rows: int, density) -> int:
    """Active row count for a density spec: a float in [0, 1] or ``"one"`` (exactly one row)."""
    if density == "one":
        return min(1, n_rows)
    return round(density * n_rows)


def controlled_threshold(weight: torch.Tensor, n_active: int, generator: torch.Generator) -> torch.Tensor:
    """A threshold giving ``n_active`` active rows, scores kept 0.2 away from both mask and gate edges
    (0 and +-1), so that float32 and float64 agree on every mask and gate. Alternate rows have
    ``|s| < 1`` and ``|s| > 1``, so every STE sees open and closed gates among active and pruned rows."""
    n_rows = weight.shape[0]
    magnitude = torch.rand(n_rows, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    magnitude[1::2] += 1.0  # [0.2, 0.8] on even rows, [1.2, 1.8] on odd rows
    sign = -torch.ones(n_rows, dtype=torch.float64)
    sign[torch.randperm(n_rows, generator=generator)[:n_active]] = 1.0
    score = sign * magnitude
    mean_abs = weight.detach().double().reshape(n_rows, -1).abs().mean(1)
    return (mean_abs - score).to(weight.dtype)


def make_params(weight_shape, n_active: int, bias: bool, seed: int):
    """float64 ``(weight, bias or None, threshold)`` with ``n_active`` active rows."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(weight_shape, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(weight_shape[0], generator=g, dtype=torch.float64) if bias else None
    return weight, b, controlled_threshold(weight, n_active, g)


def outputs_and_grads(fn, tensors: dict, grad_seed: int = 7) -> dict:
    """Run ``fn(**tensors)`` and backpropagate a fixed random ``dL/dy``.

    Returns ``{"y": y, "d<name>": grad}`` for every tensor input (None inputs skipped).
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    inputs = {k: leaves.get(k) for k in tensors}
    y = fn(**inputs)
    g = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    y.backward(grad_y)
    result = {"y": y.detach()}
    result.update({f"d{k}": v.grad for k, v in leaves.items()})
    return result


def cast(tensors: dict, dtype, device=None) -> dict:
    return {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}


def _assert_within_oracle_error(out: dict, ref_low: dict, ref64: dict, dtype, atol: float) -> None:
    """Every output/gradient of ``out`` (in ``dtype``) is at most twice as far from the float64 oracle
    ``ref64`` as the oracle run in ``dtype`` (``ref_low``), plus ``atol`` times the value's scale."""
    assert out.keys() == ref64.keys()
    for key, expected in ref64.items():
        assert out[key] is not None and out[key].dtype == dtype, key
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        ref_error = (ref_low[key].double() - expected).abs().max().item() if expected.numel() else 0.0
        error = (out[key].double() - expected).abs().max().item() if expected.numel() else 0.0
        assert error <= 2 * ref_error + atol * scale, (
            f"{key}: {dtype} error {error:.3g} > 2 x oracle's own {ref_error:.3g} + {atol * scale:.3g}"
        )


def assert_matches_oracle(fn_backend, fn_reference, tensors64: dict, atol: float = 1e-6, device="cpu") -> None:
    """Compare ``fn_backend`` in float32 and float64 with ``fn_reference`` (the oracle), on ``device``."""
    tensors64 = cast(tensors64, torch.float64, device)
    ref64 = outputs_and_grads(fn_reference, tensors64)
    ref32 = outputs_and_grads(fn_reference, cast(tensors64, torch.float32))
    out32 = outputs_and_grads(fn_backend, cast(tensors64, torch.float32))
    out64 = outputs_and_grads(fn_backend, tensors64)
    _assert_within_oracle_error(out32, ref32, ref64, torch.float32, atol)
    for key, expected in ref64.items():
        torch.testing.assert_close(out64[key], expected, rtol=1e-9, atol=1e-10, msg=key)


def assert_low_precision_matches_oracle(fn_backend, fn_reference, tensors64: dict, dtype, device="cpu") -> None:
    """16-bit version of ``assert_matches_oracle``: ``fn_backend`` in ``dtype`` against the float64 oracle,
    allowed twice the oracle's own error in ``dtype`` plus one epsilon of ``dtype`` times the scale."""
    tensors64 = cast(tensors64, torch.float64, device)
    ref64 = outputs_and_grads(fn_reference, tensors64)
    ref_low = outputs_and_grads(fn_reference, cast(tensors64, dtype))
    out = outputs_and_grads(fn_backend, cast(tensors64, dtype))
    _assert_within_oracle_error(out, ref_low, ref64, dtype, torch.finfo(dtype).eps)


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, backend: str = "aot_eager") -> None:
    """``torch.compile(model, fullgraph=True, backend=backend)`` gives eager's output and parameter
    gradients (of ``sum(out**2)``) on ``x``."""
    results = []
    for run in (torch.compile(model, fullgraph=True, backend=backend), model):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append([out.detach(), *(p.grad.clone() for p in model.parameters())])
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value)


def conv_linear_model(backend: str, in_channels: int, channels: int, hw: int, out_features: int, device="cpu"):
    """The small model the compile tests trace: SparseConv2d(in_channels -> channels, 3x3, padding 1), ReLU,
    Flatten, SparseLinear(-> out_features, ste="outer"), on ``backend``, for ``hw x hw`` inputs; seeded, with
    the conv's scores spread over [-0.5, 0.5] so that some filters are pruned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sk.SparseConv2d(in_channels, channels, 3, padding=1, backend=backend), torch.nn.ReLU(), torch.nn.Flatten(),
        sk.SparseLinear(channels * hw * hw, out_features, ste="outer", backend=backend),
    ).to(device)
    spread = torch.linspace(-0.5, 0.5, channels, device=device)
    with torch.no_grad():
        model[0].threshold.copy_(model[0].weight.abs().mean((1, 2, 3)) - spread)
    return model
