"""``cpp`` backend, sparse Conv2d: thin calls into ``torch.ops.spafl.cpp_conv2d_{fwd,bwd}``
(csrc/cpu/conv2d.cpp)."""

from __future__ import annotations

import torch

Pair = tuple[int, int]


def conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: ``[B, C, H, W]``, weight: ``[N, C/groups, kh, kw]`` -> ``(y [B, N, H', W'], score [N])``."""
    return torch.ops.spafl.cpp_conv2d_fwd(x, weight, bias, threshold, stride, padding, dilation, groups)


def conv2d_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    score: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    ste: str,
    need_dx: bool,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``conv2d_fwd`` (see ``Backend``); grad_y: ``[B, N, H', W']``."""
    return torch.ops.spafl.cpp_conv2d_bwd(
        grad_y, x, weight, bias, score, stride, padding, dilation, groups, ste, need_dx, need_params
    )
