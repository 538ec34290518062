"""SparseLinear / SparseConv2d: drop-in behaviour, masks, from_dense, repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spafl_kernels as sk


def test_linear_is_a_drop_in_for_nn_linear():
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    sparse = sk.SparseLinear.from_dense(dense)
    assert isinstance(sparse, nn.Linear)
    assert sparse.threshold.shape == (4,) and (sparse.threshold == 0).all()
    assert set(sparse.state_dict()) == {"weight", "bias", "threshold"}
    x = torch.randn(3, 6)
    torch.testing.assert_close(sparse(x), dense(x))  # tau = 0: every row active
    assert sparse.density() == 1.0 and sparse.mask().tolist() == [1.0] * 4


def test_conv_is_a_drop_in_for_nn_conv2d():
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, (3, 2), stride=2, padding="valid", dilation=(1, 2), groups=2, bias=False)
    sparse = sk.SparseConv2d.from_dense(dense, ste="outer", backend="torch")
    assert sparse.bias is None and sparse.groups == 2 and sparse.ste == "outer"
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(sparse(x), dense(x))


def test_init_matches_dense_layers():
    torch.manual_seed(1)
    dense = nn.Conv2d(3, 5, 3)
    torch.manual_seed(1)
    sparse = sk.SparseConv2d(3, 5, 3)
    torch.testing.assert_close(sparse.weight, dense.weight)
    torch.testing.assert_close(sparse.bias, dense.bias)


def test_mask_and_density_follow_thresholds():
    layer = sk.SparseLinear(4, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.threshold.copy_(layer.weight.abs().mean(1) + torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0]))
    assert layer.mask().tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert layer.mask().dtype == torch.float64
    assert layer.density() == pytest.approx(0.4)
    out = layer(torch.randn(2, 4, dtype=torch.float64))
    assert (out[:, [1, 3, 4]] == 0).all()


def test_repr_shows_density_and_backend():
    text = repr(sk.SparseConv2d(2, 3, 3, ste="clipped", backend="torch"))
    assert "SparseConv2d(2, 3, kernel_size=(3, 3)" in text
    assert "ste='clipped', backend='torch', density=1.000" in text
    assert "meta" not in repr(sk.SparseLinear(2, 3, device="meta"))


def test_from_dense_rejects_other_modules_and_padding_modes():
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        sk.SparseLinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        sk.SparseConv2d.from_dense(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))


def test_module_backward_reaches_threshold():
    layer = sk.SparseLinear(5, 3, backend="torch")
    layer(torch.randn(4, 5)).sum().backward()
    assert layer.threshold.grad is not None and layer.threshold.grad.shape == (3,)
