"""Reference sparse Conv2d: masked dense, differentiated by autograd. The test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ste import masked_params


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    ste: str,
) -> torch.Tensor:
    """x: ``[B, C, H, W]``, weight: ``[N, C/groups, kh, kw]``, bias/threshold: ``[N]`` -> ``[B, N, H', W']``."""
    masked_weight, masked_bias = masked_params(weight, bias, threshold, ste)
    return F.conv2d(x, masked_weight, masked_bias, stride, padding, dilation, groups)
