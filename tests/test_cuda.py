"""The `cuda` backend on a GPU against the reference oracle, plus what only a GPU can show: no host
synchronisation, CUDA-graph capture, the real CUDA kernels behind opcheck.

Marked ``cuda`` and skipped without a CUDA device. ``benchmarks/gpu_check.sh`` runs this file with
``SPAFL_REQUIRE_BACKENDS=cuda``, so that an install whose extension lacks the CUDA kernels fails instead
of skipping. The same shapes run on the CPU through the host emulation (test_cuda_emulation.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from oracle import (
    assert_low_precision_matches_oracle,
    assert_matches_oracle,
    cast,
    require_backend,
)
from test_cuda_emulation import (
    CONV_GEOMETRIES,
    DENSITIES,
    LINEAR_SHAPES,
    _conv,
    _conv_case,
    _linear,
    _linear_case,
    compile_matches_eager,
    opcheck_cuda_ops,
)

import spafl_kernels as sk
from spafl_kernels.semantics import STES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


def _on_gpu(tensors: dict) -> dict:
    return cast(tensors, torch.float32, DEVICE)


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m, k, n, bias", [*LINEAR_SHAPES, (300, 1027, 515, True)])
def test_linear_matches_reference(ste, density, m, k, n, bias):
    require_backend("cuda", "linear", DEVICE)
    assert_matches_oracle(
        functools.partial(_linear, "cuda", ste), functools.partial(_linear, "reference", ste),
        _linear_case(m, k, n, bias, density), device=DEVICE,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("density", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("m, k, n, bias", [(9, 65, 123, True), (70, 130, 150, False), (256, 1024, 1000, True)])
def test_linear_16bit_matches_reference(dtype, ste, density, m, k, n, bias):
    require_backend("cuda", "linear", DEVICE, dtype)
    assert_low_precision_matches_oracle(
        functools.partial(_linear, "cuda", ste), functools.partial(_linear, "reference", ste),
        _linear_case(m, k, n, bias, density), dtype, device=DEVICE,
    )


def test_linear_batched_and_empty_inputs():
    require_backend("cuda", "linear", DEVICE)
    t = _on_gpu(_linear_case(1, 5, 9, True, 0.5))
    for shape in [(5,), (2, 3, 5), (0, 5)]:
        x = torch.randn(shape, device=DEVICE)
        y = sk.sparse_linear(x, t["weight"], t["bias"], t["threshold"], backend="cuda")
        expected = sk.sparse_linear(x, t["weight"], t["bias"], t["threshold"], backend="reference")
        assert y.shape == (*shape[:-1], 9)
        torch.testing.assert_close(y, expected)


def test_linear_pruned_rows_output_exact_zeros_and_grads():
    require_backend("cuda", "linear", DEVICE)
    t = _on_gpu(_linear_case(37, 70, 130, True, 0.0))
    weight, bias, threshold = (t[k].requires_grad_() for k in ("weight", "bias", "threshold"))
    x = torch.randn(37, 70, device=DEVICE, requires_grad=True)
    y = sk.sparse_linear(x, weight, bias, threshold, backend="cuda")
    assert (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and (bias.grad == 0).all() and threshold.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ conv2d


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRIES))
def test_conv2d_matches_reference(ste, density, geometry):
    require_backend("cuda", "conv2d", DEVICE)
    tensors, conv_args = _conv_case(geometry, density)
    assert_matches_oracle(
        functools.partial(_conv, "cuda", ste, conv_args), functools.partial(_conv, "reference", ste, conv_args),
        tensors, device=DEVICE,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("geometry", ["stride-pad", "same-dilated-even", "tiles"])
def test_conv2d_16bit_matches_reference(dtype, ste, geometry):
    require_backend("cuda", "conv2d", DEVICE, dtype)
    tensors, conv_args = _conv_case(geometry, 0.5)
    assert_low_precision_matches_oracle(
        functools.partial(_conv, "cuda", ste, conv_args), functools.partial(_conv, "reference", ste, conv_args),
        tensors, dtype, device=DEVICE,
    )


def test_conv2d_channels_last_input():
    require_backend("cuda", "conv2d", DEVICE)
    tensors, conv_args = _conv_case("stride-pad", 0.5)
    tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    assert_matches_oracle(
        functools.partial(_conv, "cuda", "identity", conv_args),
        functools.partial(_conv, "reference", "identity", conv_args), tensors, device=DEVICE,
    )


def test_grouped_conv2d_is_refused_with_reason():
    x, w = torch.randn(1, 4, 5, 5, device=DEVICE), torch.randn(4, 2, 3, 3, device=DEVICE)
    t = torch.zeros(4, device=DEVICE)
    with pytest.raises(sk.BackendNotSupportedError, match="groups=2"):
        sk.sparse_conv2d(x, w, None, t, groups=2, backend="cuda")


# ------------------------------------------------------------------------------ no sync, CUDA graphs, opcheck


def test_forward_and_backward_never_synchronise():
    require_backend("cuda", "linear", DEVICE)
    lin = _on_gpu(_linear_case(64, 96, 80, True, 0.5))
    conv, conv_args = _conv_case("tiles", 0.5)
    conv = _on_gpu(conv)
    for t in (*lin.values(), *conv.values()):
        t.requires_grad_()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        y = _linear("cuda", "outer", **lin)
        z = _conv("cuda", "clipped", conv_args, **conv)
        (y.square().sum() + z.square().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert all(t.grad is not None for t in (*lin.values(), *conv.values()))


def test_cuda_graph_replay_follows_the_thresholds():
    """The mask is decided on the device at replay: changing the thresholds in place changes which rows
    run, without re-capturing (nothing about the mask was baked in on the host)."""
    require_backend("cuda", "linear", DEVICE)
    tensors = _on_gpu(_linear_case(64, 96, 130, True, 0.5))
    x, weight, bias, threshold = (tensors[k] for k in ("x", "weight", "bias", "threshold"))
    static_threshold = threshold.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        for _ in range(2):
            torch.ops.spafl.linear_fwd(x, weight, bias, static_threshold, 0, "cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, _ = torch.ops.spafl.linear_fwd(x, weight, bias, static_threshold, 0, "cuda")
    for density in (0.1, 0.5, 0.9):
        new = _on_gpu(_linear_case(64, 96, 130, True, density, seed=1))["threshold"]
        static_threshold.copy_(new)
        graph.replay()
        expected = sk.sparse_linear(x, weight, bias, new, backend="reference")
        torch.testing.assert_close(y_static, expected)


def test_opcheck_of_the_cuda_ops():
    require_backend("cuda", "linear", DEVICE)
    opcheck_cuda_ops(DEVICE)


def test_native_conv_refuses_groups():
    """Dispatch never sends groups > 1 to the cuda backend; a direct call of the op refuses it."""
    require_backend("cuda", "conv2d", DEVICE)
    x, w, t = (torch.randn(*shape, device=DEVICE) for shape in ((1, 4, 5, 5), (4, 2, 3, 3), (4,)))
    with pytest.raises(RuntimeError, match="groups=1 only"):
        torch.ops.spafl.native_conv2d_fwd(x, w, None, t, [1, 1, 0, 0, 1, 1, 2])


def test_compile_fullgraph_matches_eager():
    require_backend("cuda", "linear", DEVICE)
    compile_matches_eager(DEVICE)
