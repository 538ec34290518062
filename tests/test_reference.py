"""The oracle itself: gradcheck where the STE is the true derivative, and docs/DESIGN.md §2's equations."""

from __future__ import annotations

import pytest
import torch
from oracle import make_params

import spafl_kernels as sk


def test_gradcheck_away_from_the_step():
    """With every gate closed (``outer`` STE, all |s| < 1) the STE adds nothing, so the analytic
    gradient must equal finite differences of the masked-dense function."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.5
    score = torch.tensor([0.5, -0.5, 0.3, -0.7, 0.6, -0.4], dtype=torch.float64)
    threshold = weight.abs().mean(1) - score
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, weight, bias, threshold)]
    assert torch.autograd.gradcheck(
        lambda *a: sk.sparse_linear(*a, ste="outer", backend="reference"), inputs
    )
    xc = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wc = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    tc = (wc.detach().abs().mean((1, 2, 3)) - torch.tensor([0.4, -0.4, 0.8, -0.2], dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x_, w_, t_: sk.sparse_conv2d(x_, w_, None, t_, padding=1, ste="outer",
                                            backend="reference"),
        [xc, wc, tc.requires_grad_()],
    )


@pytest.mark.parametrize("ste", sk.STES)
def test_reference_gradients_are_design_equations(ste):
    """dL/dx, dL/dW, dL/db, dL/dtau of the oracle written out from docs/DESIGN.md §2 by hand."""
    weight, bias, threshold = make_params((7, 5), 3, True, seed=11)
    x = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, threshold)]
    sk.sparse_linear(*leaves, ste=ste, backend="reference").backward(g)

    s = weight.abs().mean(1) - threshold
    m = (s > 0).double()
    gate = {"identity": torch.ones_like(s), "outer": (s.abs() > 1).double(), "clipped": (s.abs() <= 1).double()}[ste]
    z = x @ weight.t()
    dm = (g * (z + bias)).sum(0)
    expected = [
        (g * m) @ weight,
        m[:, None] * (g.t() @ x) + (gate * dm / 5)[:, None] * weight.sign(),
        m * g.sum(0),
        -gate * dm,
    ]
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, want)
