"""The row mask as an autograd Function: forward is the step, backward is the STE gate."""

from __future__ import annotations

import torch

from ...semantics import row_mask, row_score, ste_gate


class MaskSTE(torch.autograd.Function):
    """``m = 1[s > 0]`` with ``dm/ds = gate(s)``. score: ``[N]`` -> mask ``[N]`` (score's dtype)."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, ste: str) -> torch.Tensor:
        ctx.ste = ste
        ctx.save_for_backward(score)
        return row_mask(score)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        (score,) = ctx.saved_tensors
        return grad_mask * ste_gate(score, ctx.ste), None


def masked_params(
    weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor, ste: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(m * W, m * b)``: the masked-dense parameters of the paper's code, differentiable.

    weight: ``[N, ...]``, bias: ``[N]`` or None, threshold: ``[N]``.
    """
    mask = MaskSTE.apply(row_score(weight, threshold), ste).to(weight.dtype)
    masked_weight = weight * mask.view(-1, *([1] * (weight.dim() - 1)))
    return masked_weight, (None if bias is None else bias * mask)
