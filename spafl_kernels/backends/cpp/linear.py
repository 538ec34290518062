"""``cpp`` backend, sparse Linear: thin calls into ``torch.ops.spafl.cpp_linear_{fwd,bwd}``
(csrc/cpu/linear.cpp)."""

from __future__ import annotations

import torch


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: ``[M, K]``, weight: ``[N, K]``, bias/threshold: ``[N]`` -> ``(y [M, N], score [N])``."""
    return torch.ops.spafl.cpp_linear_fwd(x, weight, bias, threshold)


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
    """Gradients of ``linear_fwd`` (see ``Backend``); grad_y: ``[M, N]``."""
    return torch.ops.spafl.cpp_linear_bwd(grad_y, x, weight, bias, score, ste, need_dx, need_params)
