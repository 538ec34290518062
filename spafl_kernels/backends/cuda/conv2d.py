"""``cuda`` backend, sparse Conv2d (``groups=1``): ``spafl::cuda_conv2d_fwd/bwd`` (implicit GEMM,
``csrc/cuda/conv2d.cu``, ``bindings.cpp``)."""

from __future__ import annotations

import torch

from ...semantics import STES

Pair = tuple[int, int]


def _check_groups(groups: int) -> None:
    # Dispatch refuses groups > 1 (not_supported_reasons); this guards direct calls of the op.
    if groups != 1:
        raise ValueError(f"the cuda backend implements groups=1 only, got groups={groups}")


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
    """x: ``[B, C, H, W]``, weight: ``[N, C, kh, kw]`` -> ``(y [B, N, H', W'], score [N])``."""
    _check_groups(groups)
    y, score = torch.ops.spafl.cuda_conv2d_fwd(x, weight, bias, threshold, list(stride), list(padding), list(dilation))
    return y, score


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
    _check_groups(groups)
    dx, dweight, dbias, dthreshold = torch.ops.spafl.cuda_conv2d_bwd(
        grad_y, x, weight, bias, score, list(stride), list(padding), list(dilation), STES.index(ste),
        need_dx, need_params,
    )
    return dx, dweight, dbias, dthreshold
