"""``cuda`` backend, sparse Linear: ``spafl::cuda_linear_fwd/bwd`` (``csrc/cuda/linear.cu``, ``bindings.cpp``)."""

from __future__ import annotations

import torch

from ...semantics import STES


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: ``[M, K]``, weight: ``[N, K]``, bias/threshold: ``[N]`` -> ``(y [M, N], score [N])``."""
    y, score = torch.ops.spafl.cuda_linear_fwd(x, weight, bias, threshold)
    return y, score


def linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    score: torch.Tensor,
    ste: str,
    need_dx: bool,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``linear_fwd`` (see ``Backend``); grad_y: ``[M, N]``. The kernels take the STE as
    its index in ``semantics.STES`` (0 identity, 1 outer, 2 clipped)."""
    dx, dweight, dbias, dthreshold = torch.ops.spafl.cuda_linear_bwd(
        grad_y, x, weight, bias, score, STES.index(ste), need_dx, need_params
    )
    return dx, dweight, dbias, dthreshold
