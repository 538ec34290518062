"""Bad input: a clear error naming the argument, raised before any work."""

from __future__ import annotations

import pytest
import torch

import spafl_kernels as sk


def linear_args(**override):
    args = {"x": torch.randn(3, 5), "weight": torch.randn(4, 5), "bias": torch.randn(4), "threshold": torch.zeros(4)}
    args.update(override)
    return args


def conv_args(**override):
    args = {"x": torch.randn(2, 4, 6, 6), "weight": torch.randn(6, 2, 3, 3), "bias": None,
            "threshold": torch.zeros(6), "groups": 2}
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, error, match",
    [
        ({"x": torch.randn(3, 6)}, ValueError, r"x must have shape \(\*, 5\)"),
        ({"x": torch.randn(())}, ValueError, "x must have shape"),
        ({"weight": torch.randn(4, 5, 1)}, ValueError, "weight must be 2-D"),
        ({"threshold": torch.zeros(5)}, ValueError, r"threshold must have shape \(4,\)"),
        ({"threshold": torch.zeros(4, 1)}, ValueError, "threshold must have shape"),
        ({"bias": torch.zeros(3)}, ValueError, r"bias must have shape \(4,\)"),
        ({"x": torch.randn(3, 5, dtype=torch.float64)}, TypeError, "x has dtype torch.float64"),
        ({"threshold": torch.zeros(4, dtype=torch.float64)}, TypeError, "threshold has dtype"),
        ({"weight": torch.randint(0, 3, (4, 5))}, TypeError, "weight must be a floating tensor"),
        ({"x": torch.randn(3, 5, device="meta")}, ValueError, "x is on meta but weight is on cpu"),
        ({"bias": [0.0] * 4}, TypeError, "bias must be a torch.Tensor"),
        ({"threshold": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, RuntimeError, "threshold has non-finite"),
        ({"threshold": torch.tensor([0.0, 0.0, float("inf"), 0.0])}, RuntimeError, "threshold has non-finite"),
    ],
)
def test_linear_bad_input(override, error, match):
    args = linear_args(**override)
    with pytest.raises(error, match=match):
        sk.sparse_linear(args["x"], args["weight"], args["bias"], args["threshold"])


@pytest.mark.parametrize(
    "override, error, match",
    [
        ({"x": torch.randn(4, 6, 6)}, ValueError, r"x must have shape \(B, 4, H, W\)"),
        ({"x": torch.randn(2, 3, 6, 6)}, ValueError, "weight.shape.1. \\* groups channels"),
        ({"groups": 4}, ValueError, r"out_channels \(6\) must be divisible by groups \(4\)"),
        ({"groups": 0}, ValueError, "groups must be a positive int"),
        ({"stride": 0}, ValueError, "stride must be an int or a pair of ints >= 1"),
        ({"stride": (1, 2, 3)}, ValueError, "stride must be"),
        ({"padding": -1}, ValueError, "padding must be an int or a pair of ints >= 0"),
        ({"padding": "full"}, ValueError, "padding must be an int, a pair, 'same' or 'valid'"),
        ({"padding": "same", "stride": 2}, ValueError, "padding='same' needs stride 1"),
        ({"dilation": (1, 0)}, ValueError, "dilation must be"),
        ({"x": torch.randn(2, 4, 2, 6)}, ValueError, r"padded input height .* smaller than the dilated kernel"),
        ({"weight": torch.randn(6, 2, 3)}, ValueError, "weight must be 4-D"),
        ({"threshold": torch.zeros(5)}, ValueError, r"threshold must have shape \(6,\)"),
    ],
)
def test_conv2d_bad_input(override, error, match):
    args = conv_args(**override)
    kwargs = {k: args[k] for k in ("stride", "padding", "dilation") if k in args}
    with pytest.raises(error, match=match):
        sk.sparse_conv2d(args["x"], args["weight"], args["bias"], args["threshold"], groups=args["groups"], **kwargs)


def test_unknown_ste_and_backend():
    args = linear_args()
    with pytest.raises(ValueError, match="ste must be one of"):
        sk.sparse_linear(*args.values(), ste="sigmoid")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sk.sparse_linear(*args.values(), backend="fast")
    with pytest.raises(ValueError, match="ste must be one of"):
        sk.SparseLinear(3, 4, ste="nope")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sk.SparseConv2d(3, 4, 3, backend="nope")


def test_a_call_unlike_every_checked_one_is_checked_again(monkeypatch):
    """Valid calls are remembered (functional._CHECKED) by all that the checks read, so that a model's
    repeated calls skip them: a call that differs from a remembered one in any checked thing (a constant's
    type, a dtype, a shape, SPAFL_BACKEND, an unhashable argument) is checked again, and raises."""
    monkeypatch.delenv("SPAFL_BACKEND", raising=False)
    conv = conv_args()
    sk.sparse_conv2d(conv["x"], conv["weight"], None, conv["threshold"], stride=1, groups=2)
    with pytest.raises(ValueError, match="stride must be"):
        sk.sparse_conv2d(conv["x"], conv["weight"], None, conv["threshold"], stride=1.0, groups=2)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        sk.sparse_conv2d(conv["x"], conv["weight"], None, conv["threshold"], stride=1, groups=2.0)
    with pytest.raises(ValueError, match="padded input height"):
        sk.sparse_conv2d(conv["x"][:, :, :2], conv["weight"], None, conv["threshold"], stride=1, groups=2)
    args = linear_args()
    sk.sparse_linear(*args.values())
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        sk.sparse_linear(args["x"], args["weight"], args["bias"].double(), args["threshold"])
    with pytest.raises(ValueError, match="ste must be one of"):
        sk.sparse_linear(*args.values(), ste=["identity"])
    monkeypatch.setenv("SPAFL_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sk.sparse_linear(*args.values())


def test_remembered_calls_are_bounded(monkeypatch):
    monkeypatch.setattr(sk.functional, "_CHECKED_MAX", 3)
    monkeypatch.setattr(sk.functional, "_CHECKED", {})
    args = linear_args()
    for batch in range(1, 8):  # a new batch size is a new call
        sk.sparse_linear(args["x"][:batch], args["weight"], args["bias"], args["threshold"])
        assert 1 <= len(sk.functional._CHECKED) <= 3


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_meta_tensors_give_shapes(backend):
    """A model built on the meta device (to size it, or before ``to_empty``) runs: outputs and gradients
    with the right shapes, on the torch backend (``auto`` picks it there) as on the reference."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.nn.Flatten(),
                                    torch.nn.Linear(6 * 5 * 5, 3))
    sk.sparsify(model, backend=backend)
    x = torch.randn(2, 4, 5, 5, device="meta", requires_grad=True)
    y = model(x)
    assert y.shape == (2, 3) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_meta
    for layer in (model[0], model[2]):
        assert layer.weight.grad.shape == layer.weight.shape and layer.threshold.grad.shape == layer.threshold.shape
    assert "SparseLinear" in repr(model)


def test_torch_jit_script_refused_clearly():
    model = sk.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile SparseLinear.*use torch.compile"):
        torch.jit.script(model)
