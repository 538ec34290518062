"""The ``triton`` backend beyond the shared oracle tests: its device-side row lists, tile and split paths,
Conv2d layouts, the op contract, and (with CUDA) half precision, full-size layers and CUDA-graph capture.

On the CPU everything runs in Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets for
this file); without it the CPU tests skip, or fail where ``SPAFL_REQUIRE_BACKENDS`` lists ``triton``.
Tests marked ``cuda`` skip without a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_compiled_matches_eager,
    assert_low_precision_matches_oracle,
    assert_matches_oracle,
    conv_linear_model,
    make_params,
    require_backend,
)

import spafl_kernels as sk
from spafl_kernels.backends import get_backend
from spafl_kernels.backends.base import CallSpec
from spafl_kernels.semantics import STE_CODES, STES, ste_gate

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
"""Where the device-agnostic tests run: the GPU when there is one, else the CPU (interpreter)."""


def cuda(test):
    """Marks a test ``cuda`` (``pytest -m cuda`` selects the GPU checks) and skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


def _set_tf32(matmul: bool, cudnn: bool) -> tuple[bool, bool]:
    """Set torch's tf32 switches (properties monkeypatch cannot see); returns the previous values."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    return previous


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 in the kernels and the oracle (on CUDA both follow torch's tf32 switches, and cuDNN's
    is on by default), so that float32 errors measure the kernels; test_tf32_on_cuda turns them on."""
    previous = _set_tf32(False, False)
    yield
    _set_tf32(*previous)


def _rows():
    """The backend's row-list module (imported lazily: it needs triton)."""
    require_backend("triton", "linear", DEVICE)
    from spafl_kernels.backends.triton import rows

    return rows


def _linear(ste, x, weight, threshold, bias=None, backend="triton"):
    return sk.sparse_linear(x, weight, bias, threshold, ste=ste, backend=backend)


def _conv(ste, geometry, x, weight, threshold, bias=None, backend="triton"):
    stride, padding, dilation, groups = geometry
    return sk.sparse_conv2d(x, weight, bias, threshold, stride, padding, dilation, groups, ste=ste, backend=backend)


# ------------------------------------------------------------------------------- row bookkeeping


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("ste", STES)
def test_compaction_lists_rows_per_group_on_the_device(ste, groups):
    rows = _rows()
    score = torch.tensor([0.5, -0.2, 1.5, -1.5, 0.0, 2.0, -0.7, 0.3, -3.0, 0.9, -0.1, 1.0] * 12, device=DEVICE)
    n = score.numel()
    active, count, graded, graded_count = rows.compact(score, groups, STE_CODES[ste])
    per_group = n // groups
    gate = ste_gate(score, ste) != 0
    for g in range(groups):
        seg = slice(g * per_group, (g + 1) * per_group)
        expected_active = (score[seg] > 0).nonzero().squeeze(1) + g * per_group
        expected_graded = ((score[seg] > 0) | gate[seg]).nonzero().squeeze(1) + g * per_group
        k, kg = int(count[g]), int(graded_count[g])
        assert k == expected_active.numel() and kg == expected_graded.numel()
        listed = active[seg].long()
        assert torch.equal(listed[:k], expected_active)  # active rows first, ascending
        assert sorted(listed.tolist()) == list(range(seg.start, seg.stop))  # then every pruned row once
        assert torch.equal(graded[seg][:kg].long(), expected_graded)


def test_compaction_without_graded_list_and_scores_match_semantics():
    rows = _rows()
    weight, _, threshold = make_params((70, 3, 2, 2), 30, False, seed=4)
    weight, threshold = weight.float().to(DEVICE), threshold.float().to(DEVICE)
    score = rows.row_scores(weight, threshold)
    torch.testing.assert_close(score, sk.semantics.row_score(weight, threshold))
    active, count, graded, graded_count = rows.compact(score, 1, None)
    assert graded is None and graded_count is None and int(count[0]) == 30
    assert torch.equal(active[:30].long(), (score > 0).nonzero().squeeze(1))


# ------------------------------------------------------------- tiles, splits and layouts (oracle)


@pytest.mark.parametrize("ste", STES)
def test_linear_many_tiles_and_split_reduction(ste):
    """A batch long enough that the dW GEMM splits its reduction, and rows spanning several tiles."""
    weight, b, threshold = make_params((70, 45), 29, True, seed=5)
    batch = 600 if HAS_CUDA else 150  # enough positions for a split on either device
    x = torch.randn(batch, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _rows().reduction_split(batch, 70, 45, torch.device(DEVICE)) > 1
    assert_matches_oracle(
        functools.partial(_linear, ste), functools.partial(_linear, ste, backend="reference"),
        {"x": x, "weight": weight, "threshold": threshold, "bias": b}, device=DEVICE,
    )


CONV_CASES = {
    # name: (batch, in_channels, H, W, out_channels, kernel, stride, padding, dilation, groups)
    "split": (4, 5, 9, 8, 11, (3, 3), 1, 1, 1, 1),
    "strided-dilated": (2, 4, 11, 10, 6, (3, 2), (2, 3), (2, 1), (2, 1), 1),
    "groups": (2, 6, 6, 5, 8, (1, 3), 1, (0, 1), 1, 2),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_weight", "strided"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_layouts(case, layout):
    batch, cin, h, w, cout, kernel, stride, padding, dilation, groups = CONV_CASES[case]
    require_backend("triton", "conv2d", DEVICE, groups=groups)
    weight, b, threshold = make_params((cout, cin // groups, *kernel), cout // 2, True, seed=cout)
    x = torch.randn(batch, cin, h, w + 3 * (layout == "strided"), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_weight":  # the kernels then read rows in (kh, kw, c) order
        weight = weight.contiguous(memory_format=torch.channels_last)
    geometry = (stride, padding, dilation, groups)
    fn = functools.partial(_conv, "identity", geometry)
    ref = functools.partial(_conv, "identity", geometry, backend="reference")
    if layout == "strided":
        fn, ref = (functools.partial(_sliced, op) for op in (fn, ref))
    assert_matches_oracle(fn, ref, {"x": x, "weight": weight, "threshold": threshold, "bias": b}, device=DEVICE)


def _sliced(op, x, **rest):
    """``op`` on a view of x without its first 3 columns: strides that no dense layout has."""
    return op(x=x[..., 3:], **rest)


def test_conv2d_dx_keeps_channels_last_and_weight_grad_its_layout():
    require_backend("triton", "conv2d", DEVICE)
    weight, b, threshold = (t.float().to(DEVICE) for t in make_params((6, 4, 3, 3), 3, True, seed=1))
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 4, 7, 7, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = sk.sparse_conv2d(x, weight, b, threshold, padding=1, backend="triton")
    assert y.is_contiguous()  # as the op's fake kernel promises
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert weight.grad.stride() == weight.stride()


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_partial_gradients(op):
    """Only x needs a gradient (frozen layer), or only the parameters (first layer)."""
    require_backend("triton", op, DEVICE)
    if op == "linear":
        weight, b, threshold = (t.float().to(DEVICE) for t in make_params((9, 6), 4, True, seed=2))
        x = torch.randn(5, 6, device=DEVICE)
        call = functools.partial(sk.sparse_linear, ste="clipped")
    else:
        weight, b, threshold = (t.float().to(DEVICE) for t in make_params((5, 3, 3, 3), 2, True, seed=2))
        x = torch.randn(2, 3, 6, 6, device=DEVICE)
        call = functools.partial(sk.sparse_conv2d, ste="clipped", padding=1)
    for wants_x in (True, False):
        grads = {}
        for backend in ("reference", "triton"):
            leaves = [t.clone().requires_grad_(wants_x != (i > 0)) for i, t in enumerate((x, weight, b, threshold))]
            call(*leaves, backend=backend).square().sum().backward()
            grads[backend] = [t.grad for t in leaves]
        for ref, got in zip(grads["reference"], grads["triton"]):
            assert (ref is None) == (got is None)
            if ref is not None:
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_pruned_outputs_are_exact_zeros_in_mixed_tiles():
    require_backend("triton", "linear", DEVICE)
    weight, b, threshold = (t.float().to(DEVICE) for t in make_params((45, 8), 20, True, seed=6))
    y = sk.sparse_linear(torch.randn(33, 8, device=DEVICE), weight, b, threshold, backend="triton")
    mask = sk.semantics.row_score(weight, threshold) > 0
    assert (y[:, ~mask] == 0).all() and (y[:, mask] != 0).all()


# --------------------------------------------------------------------------------- op contract


def test_opcheck_linear_and_conv2d():
    require_backend("triton", "conv2d", DEVICE)
    weight, b, threshold = (t.float().to(DEVICE) for t in make_params((5, 4), 2, True, seed=7))
    x = torch.randn(3, 4, device=DEVICE)
    args = [t.clone().requires_grad_() for t in (x, weight, b, threshold)]
    torch.library.opcheck(torch.ops.spafl.linear_fwd.default, (*args, 1, "triton"))  # ste 1: outer
    weight, b, threshold = (t.float().to(DEVICE) for t in make_params((4, 2, 3, 3), 2, True, seed=7))
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    args = [t.clone().requires_grad_() for t in (x, weight, b, threshold)]
    torch.library.opcheck(torch.ops.spafl.conv2d_fwd.default, (*args, [1, 1, 1, 1, 1, 1, 1], 0, "triton"))


def test_compile_fullgraph_matches_eager():
    require_backend("triton", "conv2d", DEVICE)
    model = conv_linear_model("triton", 2, 6, 4, 5, DEVICE)
    assert_compiled_matches_eager(model, torch.randn(3, 2, 4, 4, device=DEVICE))


def test_reasons_name_the_interpreter_and_the_device(monkeypatch):
    require_backend("triton", "linear", DEVICE)  # the module imports (triton is installed)
    import spafl_kernels.backends.triton as triton_backend

    backend = get_backend("triton")
    monkeypatch.setattr(triton_backend, "INTERPRET", True)
    assert backend.not_supported_reasons(CallSpec("conv2d", "cpu", torch.bfloat16, groups=4)) == []
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    (reason,) = backend.not_supported_reasons(CallSpec("linear", "cpu", torch.float32))
    assert "TRITON_INTERPRET=1" in reason
    assert "mps" in backend.not_supported_reasons(CallSpec("linear", "mps", torch.float32))[0]
    assert backend.auto_device_types == ("cuda",) and sk.AUTO_ORDER[0] == "triton"


# ----------------------------------------------------------------------------------- CUDA only


def _identity_ops(op: str):
    """``(triton, reference)`` callables of ``op`` with the identity STE; Conv2d: 3x3, padding 1."""
    if op == "linear":
        return functools.partial(_linear, "identity"), functools.partial(_linear, "identity", backend="reference")
    geometry = (1, 1, 1, 1)
    return functools.partial(_conv, "identity", geometry), functools.partial(_conv, "identity", geometry,
                                                                             backend="reference")


def _inputs(x_shape, w_shape, n_active: int, seed: int) -> dict:
    """float64 inputs with a bias and ``n_active`` active rows."""
    weight, b, threshold = make_params(w_shape, n_active, True, seed=seed)
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "weight": weight, "threshold": threshold, "bias": b}


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_half_precision_on_cuda(op, dtype):
    shapes = {"linear": ((33, 80), (96, 80), 40), "conv2d": ((4, 16, 12, 12), (24, 16, 3, 3), 10)}[op]
    assert_low_precision_matches_oracle(*_identity_ops(op), _inputs(*shapes, seed=8), dtype, device="cuda")


@cuda
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_tf32_on_cuda(op):
    """With torch's tf32 switches on, the kernels use tf32 too: as close to the float64 oracle as the
    oracle (cuBLAS / cuDNN in tf32) is. (The autouse fixture restores the switches afterwards.)"""
    _set_tf32(True, True)
    shapes = {"linear": ((128, 512), (256, 512), 100), "conv2d": ((8, 32, 16, 16), (64, 32, 3, 3), 30)}[op]
    assert_low_precision_matches_oracle(*_identity_ops(op), _inputs(*shapes, seed=9), torch.float32, device="cuda")


@cuda
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("layer", ["linear-large", "conv-large"])
def test_full_size_layers_on_cuda(layer, density):
    """The benchmark's large layers (docs/DESIGN.md §5) in float32 against the float64 oracle."""
    from spafl_kernels.bench.layers import make_case

    case = make_case(layer, density, "identity", device="cpu")
    tensors = {"x": case.x.double(), "weight": case.weight.double(), "threshold": case.threshold.double(),
               "bias": torch.randn(case.weight.shape[0], dtype=torch.float64)}
    fn, ref = _identity_ops("linear" if layer == "linear-large" else "conv2d")
    # float32 only (the 16-bit rule with float32's epsilon): float64 would compile every kernel again.
    assert_low_precision_matches_oracle(fn, ref, tensors, torch.float32, device="cuda")


def _small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sk.SparseConv2d(3, 16, 3, padding=1, backend="triton"), torch.nn.ReLU(),
        sk.SparseConv2d(16, 16, 3, stride=2, padding=1, ste="outer", backend="triton"), torch.nn.ReLU(),
        torch.nn.Flatten(), sk.SparseLinear(16 * 8 * 8, 10, ste="clipped", backend="triton"),
    ).cuda()
    with torch.no_grad():
        for layer in (model[0], model[2], model[5]):
            rows = layer.weight.shape[0]
            layer.threshold.copy_(layer.weight.abs().flatten(1).mean(1) - torch.linspace(-0.5, 0.5, rows).cuda())
    return model


def _step(model, x, target):
    loss = F.cross_entropy(model(x), target) + 1e-3 * sk.threshold_penalty(model)
    loss.backward()
    return loss


@cuda
def test_no_host_synchronisation_in_a_training_step():
    model = _small_model()
    x, target = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    _step(model, x, target)  # autotuning and compilation synchronise: done before checking
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, x, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_training_step_captured_in_a_cuda_graph_follows_threshold_changes():
    """Capture forward + backward once; replays must follow new inputs and new masks (the active-row
    count lives on the device), matching eager steps."""
    model = _small_model()
    static_x = torch.randn(8, 3, 16, 16, device="cuda")
    static_target = torch.randint(0, 10, (8,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: autotuning, compilation, allocator
            model.zero_grad(set_to_none=True)
            _step(model, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(model, static_x, static_target)

    for prune in (0.0, 0.3):
        with torch.no_grad():
            model[2].threshold.add_(prune)  # changes the second conv's mask between replays
        x, target = torch.randn_like(static_x), torch.randint(0, 10, (8,), device="cuda")
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        replayed = [static_loss.detach().clone(), *(p.grad.clone() for p in model.parameters())]
        grads = [p.grad for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        eager = [_step(model, x, target).detach(), *(p.grad for p in model.parameters())]
        for p, g in zip(model.parameters(), grads):
            p.grad = g  # the graph's gradient buffers, for the next replay
        for got, expected in zip(replayed, eager):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
