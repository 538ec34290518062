"""The benchmarks' ``masked`` candidate: the paper's masked dense layer, as its code computes it.

``m = step(mean|W_row| - tau)`` with the STE as an autograd Function, then the dense op on ``m * W`` and ``m * b``.
The mean is PyTorch's own ``abs().mean()``, as in the paper's code, not ``semantics.row_score``'s tie-exact lane
sum (about 20 small ops: on a small layer it made masked dense several times slower than the paper's code, which
flattered every ``vs masked`` figure). At a threshold exactly on a row's mean the two may prune differently; the
``reference`` backend, not this, is the oracle of the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.reference.ste import MaskSTE
from ..modules import SparseConv2d, SparseLayer


def paper_masked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor, ste: str,
    conv: dict | None = None,
) -> torch.Tensor:
    """The paper's masked dense Linear (``conv`` None: x ``[*, K]``, weight ``[N, K]``) or Conv2d (``conv``: the
    ``F.conv2d`` keyword arguments; x ``[B, C, H, W]``, weight ``[N, C/groups, kh, kw]``); bias, threshold ``[N]``."""
    rows = weight.shape[0]
    mask = MaskSTE.apply(weight.abs().reshape(rows, -1).mean(1) - threshold, ste).to(weight.dtype)
    masked_weight = weight * mask.view(-1, *[1] * (weight.dim() - 1))
    masked_bias = None if bias is None else bias * mask
    if conv is None:
        return F.linear(x, masked_weight, masked_bias)
    return F.conv2d(x, masked_weight, masked_bias, **conv)


class PaperMaskedLayer(nn.Module):
    """A sparse layer (``layer``, kept as a child: its parameters train) computed as the paper's masked dense."""

    def __init__(self, layer: SparseLayer):
        super().__init__()
        self.layer = layer
        self.conv = None
        if isinstance(layer, SparseConv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return paper_masked(x, layer.weight, layer.bias, layer.threshold, layer.ste, self.conv)
