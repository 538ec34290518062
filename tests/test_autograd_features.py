"""Autograd features beyond first-order backward (docs/DESIGN.md §8): a kernel backend raises a clear error for
double backward, forward-mode AD and vmap, never a wrong number; the reference supports double backward.
Also the semantics of NaN weights: a NaN row counts as active, so the NaN reaches its outputs and
gradients exactly as in masked dense."""

from __future__ import annotations

import functools

import pytest
import torch
from oracle import KERNEL_BACKENDS, make_params, require_backend

import spafl_kernels as sk


def _layer(op: str, backend: str):
    """``f(weight) -> scalar loss`` through one sparse layer, and a weight for it."""
    gen = torch.Generator().manual_seed(0)
    if op == "linear":
        x, weight = torch.randn(3, 5, generator=gen), torch.randn(6, 5, generator=gen)
        return (lambda w: sk.sparse_linear(x, w, None, torch.zeros(6), backend=backend).square().sum()), weight
    x, weight = torch.randn(2, 2, 5, 5, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    return (lambda w: sk.sparse_conv2d(x, w, None, torch.zeros(4), backend=backend).square().sum()), weight


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_reference_supports_double_backward(op):
    f, weight = _layer(op, "reference")
    hessian = torch.autograd.functional.hessian(f, weight)
    assert hessian.abs().sum() > 0  # masked dense: the hessian of a sum of squares is not zero


@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend, op):
    require_backend(backend, op)
    f, weight = _layer(op, backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.functional.hessian(f, weight)
    # create_graph=True alone is fine while nobody differentiates the gradient again.
    w = weight.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(w), w, create_graph=True)
    (expected,) = torch.autograd.grad(_layer(op, "reference")[0](w), w)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_through_the_op_raises(backend):
    """The ``torch.ops.spafl`` path (the one ``torch.compile`` traces) refuses too, never returns 0."""
    require_backend(backend, "linear")
    x = torch.randn(3, 5)

    def f(w):
        return torch.ops.spafl.linear_fwd(x, w, None, torch.zeros(6), 0, backend)[0].square().sum()

    with pytest.raises(RuntimeError, match="double backward|differentiable|autograd"):
        torch.autograd.functional.hessian(f, torch.randn(6, 5))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_mode_and_vmap_raise(backend):
    require_backend(backend, "linear")
    f, weight = _layer("linear", backend)
    with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
        with torch.autograd.forward_ad.dual_level():
            f(torch.autograd.forward_ad.make_dual(weight, torch.ones_like(weight)))
    # torch.func transforms: PyTorch's own refusal of an autograd.Function without setup_context.
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.jvp(f, (weight,), (torch.ones_like(weight),))
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.vmap(lambda x: sk.sparse_linear(x, weight, None, torch.zeros(6), backend=backend))(
            torch.randn(4, 3, 5)
        )


def _six_row_layer(op: str, seed: int):
    """``(sparse_linear or sparse_conv2d, x, weight, bias)``: a small layer with 6 rows."""
    gen = torch.Generator().manual_seed(seed)
    if op == "linear":
        x, weight = torch.randn(4, 5, generator=gen), torch.randn(6, 5, generator=gen)
    else:
        x, weight = torch.randn(2, 2, 5, 5, generator=gen), torch.randn(6, 2, 3, 3, generator=gen)
    fn = sk.sparse_linear if op == "linear" else sk.sparse_conv2d
    return fn, x, weight, torch.randn(6, generator=gen)


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_row_matches_reference(backend, op, ste):
    """A weight row holding a NaN: NaN outputs exactly where masked dense has them."""
    require_backend(backend, op)
    fn, x, weight, bias = _six_row_layer(op, seed=1)
    weight[2].view(-1)[3] = float("nan")
    threshold = torch.tensor([0.0, 9.0, 0.0, 9.0, 0.0, 0.0])  # rows 1 and 3 pruned
    results = []
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]
        y = fn(*leaves, ste=ste, backend=name)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), *(t.grad for t in leaves)])
    ref, out = results
    assert ref[0][:, 2].isnan().all() and (ref[0][:, 1] == 0).all()
    torch.testing.assert_close(out[0], ref[0], equal_nan=True, msg="y")
    # Gradients: non-finite wherever masked dense's are, equal elsewhere. A product's algorithm may
    # spread a NaN further (an implicit-GEMM dx multiplies padding zeros by the NaN tap; dense
    # cuDNN algorithms differ the same way), never less: a NaN is never hidden.
    for key, a, b in zip(("dx", "dweight", "dbias", "dthreshold"), out[1:], ref[1:]):
        assert not (a.isfinite() & ~b.isfinite()).any(), f"{key}: finite where the reference is not"
        both = a.isfinite() & b.isfinite()
        torch.testing.assert_close(a[both], b[both], msg=key)


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_gradient_columns_behind_relu_match_reference(backend, op, ste):
    """Behind a ReLU a pruned row's incoming gradient is zero over the whole batch, so its dL/dm is 0
    and a backend may skip its G (exact skipping): gradients stay the reference's. One pruned row also
    gets a non-zero gradient through a second path, so skipped and kept pruned rows are both there."""
    require_backend(backend, op)
    gen = torch.Generator().manual_seed(3)
    if op == "linear":
        x, weight = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(9, 7, generator=gen,
                                                                                       dtype=torch.float64)
        fn = sk.sparse_linear
    else:
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
        weight = torch.randn(9, 3, 3, 3, generator=gen, dtype=torch.float64)
        fn = sk.sparse_conv2d
    bias = torch.randn(9, generator=gen, dtype=torch.float64)
    score = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.4, -0.3, -1.2, 0.7, -0.6], dtype=torch.float64)
    threshold = weight.reshape(9, -1).abs().mean(1) - score
    results = []
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]
        y = fn(*leaves, ste=ste, backend=name)
        (torch.relu(y).square().sum() + y.select(1, 3).sum()).backward()  # row 3 (pruned) still gets a gradient
        results.append([y.detach(), *(t.grad for t in leaves)])
    for key, a, b in zip(("y", "dx", "dweight", "dbias", "dthreshold"), *results):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("op, position", [("linear", 0), ("linear", 17), ("linear", 39),
                                           ("conv2d", 0), ("conv2d", 100), ("conv2d", 399)])
@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_one_nonzero_is_found(backend, ste, op, position):
    """Zero columns and planes are found by scans that stop early: Linear's stream 40 batch rows and may
    stop after every 16th, Conv2d's read planes of 20x20 = 400 pixels in blocks of 64 (six and a tail).
    A pruned row's gradient and a dead input column (channel) that each hold a single non-zero (first,
    in a later block or row, last; in the last sample only for Conv2d) must count as non-zero, and a
    gradient of -0.0 as zero: outputs and gradients stay the reference's."""
    require_backend(backend, op)
    batch, plane = (40, ()) if op == "linear" else (3, (20, 20))
    x, weight, bias, threshold = _dead_input_layer(op, 4, seed=14, batch=batch, plane=(20, 20))
    at = (position, 5) if op == "linear" else (2, 5, position // 20, position % 20)
    x[at] = 1.5  # dead input 5 comes alive in one element
    active = weight.reshape(9, -1).abs().mean(1) > threshold
    pruned = [i for i in range(9) if not active[i]]
    grad_y = torch.randn(batch, 9, *plane, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grad_y[:, pruned] = 0.0
    grad_y[(at[0], pruned[0], *at[2:])] = -2.0  # one pruned row gets one non-zero
    grad_y[:, pruned[1]] = -0.0
    fn = sk.sparse_linear if op == "linear" else functools.partial(sk.sparse_conv2d, padding=1)
    results = []
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]
        y = fn(*leaves, ste=ste, backend=name)
        y.backward(grad_y)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for key, a, b in zip(("y", "dx", "dweight", "dbias", "dthreshold"), *results):
        torch.testing.assert_close(a, b, msg=key)
    if ste == "identity":  # the lone non-zero reaches dL/dm of its row
        assert results[0][4][pruned[0]] != 0


def _dead_input_layer(op: str, n_active: int, seed: int, batch: int | None = None, plane: tuple[int, int] = (6, 6)):
    """x (float64) whose input columns (Linear) or channels (Conv2d) 1, 2, 5, 6, 9 and 10 of 12 are zero
    over the whole batch, as behind a pruned row and ReLU, and a layer (weight, bias, threshold) of 9
    rows of which ``n_active`` are active. ``batch``: rows of x (default 6 for Linear, 2 for Conv2d);
    Conv2d's x has ``plane`` (H, W) pixels per channel."""
    gen = torch.Generator().manual_seed(seed)
    if op == "linear":
        shape, row = (batch or 6, 12), (12,)
    else:
        shape, row = (batch or 2, 12, *plane), (12, 3, 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[:, [1, 2, 5, 6, 9, 10]] = 0.0
    weight, bias, threshold = make_params((9, *row), n_active, True, seed)
    return x, weight, bias, threshold


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("n_active", [0, 4, 9])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_input_columns_match_reference(backend, op, n_active, ste):
    """Input columns (channels) that are zero over the whole batch add nothing to the forward product or
    to G; a backend may drop them (exact skipping). Outputs and all gradients stay the reference's,
    also when every input is zero. dx keeps its values on the dead columns (the layer before needs them)."""
    require_backend(backend, op)
    x, weight, bias, threshold = _dead_input_layer(op, n_active, seed=11)
    fn = sk.sparse_linear if op == "linear" else sk.sparse_conv2d
    for inputs in (x, torch.zeros_like(x)):
        results = []
        for name in ("reference", backend):
            leaves = [t.clone().requires_grad_() for t in (inputs, weight, bias, threshold)]
            y = fn(*leaves, ste=ste, backend=name)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
            results.append([y.detach(), *(t.grad for t in leaves)])
        for key, a, b in zip(("y", "dx", "dweight", "dbias", "dthreshold"), *results):
            torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_weight_on_zero_input_column_stays_nan(backend, op):
    """A NaN (or infinite) weight times a zero input is NaN in masked dense: skipping the zero input
    column must not hide it."""
    require_backend(backend, op)
    x, weight, bias, threshold = _dead_input_layer(op, 9, seed=12)
    weight[3, 1] = float("nan")  # row 3 (active) on dead input column 1
    weight[5, 2] = float("inf")
    fn = sk.sparse_linear if op == "linear" else sk.sparse_conv2d
    want = fn(x, weight, bias, threshold, backend="reference")
    got = fn(x, weight, bias, threshold, backend=backend)
    assert want[:, 3].isnan().all()
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_gradient_on_zero_input_column_stays_nan(backend, op):
    """A NaN in dL/dy times a zero input column is NaN in masked dense's weight gradient: skipping the
    zero column in G must not hide it."""
    require_backend(backend, op)
    x, weight, bias, threshold = _dead_input_layer(op, 9, seed=13)
    results = []
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]
        y = (sk.sparse_linear if op == "linear" else sk.sparse_conv2d)(*leaves, backend=name)
        grad_y = torch.ones_like(y)
        grad_y[0, 3] = float("nan")  # row 3 of sample 0
        y.backward(grad_y)
        results.append([t.grad for t in leaves[1:]])
    (ref_dw, *_), (dw, *_) = results
    assert ref_dw[3].isnan().all()
    torch.testing.assert_close(dw, ref_dw, equal_nan=True)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", sk.BACKEND_NAMES)
def test_graph_mechanics_match_plain_autograd(backend, op):
    """What PyTorch users rely on beyond .backward(), on every backend (the native backends build their
    own autograd node, csrc/autograd.cpp): a saved input modified in place raises at backward; a second
    backward raises unless the graph was retained, and then accumulates; torch.autograd.grad of a subset
    of the inputs gives the reference's gradients for that subset."""
    require_backend(backend, op)
    fn, x, weight, bias = _six_row_layer(op, seed=3)
    threshold = torch.tensor([0.0, 9.0, 0.0, 0.0, 9.0, 0.0])  # rows 1 and 4 pruned

    def leaves():
        return [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]

    # A saved input modified in place.
    xs, w, b, t = leaves()
    x_in = xs * 1  # a non-leaf, so that it can be modified in place
    y = fn(x_in, w, b, t, backend=backend)
    x_in.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    # Backward twice.
    y = fn(*leaves(), backend=backend)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    params = leaves()
    y = fn(*params, backend=backend)
    y.sum().backward(retain_graph=True)
    once = [p.grad.clone() for p in params]
    y.sum().backward()
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g)

    # Gradients of a subset of the inputs only.
    ref = leaves()
    ref_grads = torch.autograd.grad(fn(*ref, backend="reference").square().sum(), ref)
    for subset in ([0], [3], [1, 2]):
        params = leaves()
        grads = torch.autograd.grad(fn(*params, backend=backend).square().sum(), [params[i] for i in subset])
        for i, g in zip(subset, grads):
            torch.testing.assert_close(g, ref_grads[i], msg=f"input {i}")


# ------------------------------------------------------------------------------------------ autocast


def _autocast_layer(op: str, backend: str, density: float) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = (sk.SparseLinear(7, 6, backend=backend) if op == "linear"
             else sk.SparseConv2d(3, 6, 3, padding=1, backend=backend))
    with torch.no_grad():
        layer.threshold[: round(6 * (1 - density))] = 1e3
    return layer


def _forward_backward(layer, x, autocast: bool, backward_inside: bool = False):
    layer.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
        if backward_inside:
            y.square().sum().backward()
    if not backward_inside:
        y.square().sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.threshold.grad


@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("backend", sk.BACKEND_NAMES)
def test_autocast_computes_in_the_parameters_dtype(backend, op, density):
    """Under torch.autocast (bfloat16, CPU) a sparse layer computes in its parameters' dtype: the output is
    float32 whatever the mask (the cpp Linear returned bfloat16 with every row active, float32 otherwise),
    values and gradients are those without autocast, and backward works inside or outside the context."""
    if backend != "reference":
        require_backend(backend, op)
    layer = _autocast_layer(op, backend, density)
    x = torch.randn(4, 7) if op == "linear" else torch.randn(2, 3, 5, 5)
    plain = _forward_backward(layer, x, autocast=False)
    for inside in (False, True):
        got = _forward_backward(layer, x, autocast=True, backward_inside=inside)
        assert got[0].dtype == torch.float32
        # (PyTorch's own backward ops autocast inside the context: the reference's gradients are bfloat16's.)
        tolerance = 0.05 if inside and backend == "reference" else 0.0
        for value, want in zip(got, plain):
            torch.testing.assert_close(value, want, rtol=tolerance, atol=tolerance)
    # A bfloat16 input (the output of an autocast nn.Linear before it) is cast to the weight's dtype too.
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x.bfloat16().float()), rtol=0, atol=0)
