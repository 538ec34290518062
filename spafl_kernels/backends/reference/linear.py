"""Reference sparse Linear: masked dense, differentiated by autograd. The test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ste import masked_params


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    ste: str,
) -> torch.Tensor:
    """x: ``[*, K]``, weight: ``[N, K]``, bias: ``[N]`` or None, threshold: ``[N]`` -> ``[*, N]``."""
    masked_weight, masked_bias = masked_params(weight, bias, threshold, ste)
    return F.linear(x, masked_weight, masked_bias)
