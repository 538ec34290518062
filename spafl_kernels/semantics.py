"""The SpaFL layer semantics every backend meets (DESIGN.md §2), in plain PyTorch.

A layer's weight has ``N`` rows (output neurons of a Linear, filters of a Conv2d); row ``i`` holds
``fan_in(i)`` elements. Each row has a trainable threshold ``tau_i``:

    score  s_i = mean_j |W_ij| - tau_i
    mask   m_i = 1 if s_i > 0 else 0
    output y   = op(x, m * W) + m * b

The step has no derivative; a straight-through estimator (STE) ``dm_i/ds_i = gate(s_i)`` replaces it.
Backends import the pieces below instead of re-deriving them, so the definitions live in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

STES = ("identity", "outer", "clipped")
"""Names accepted by ``ste=``: ``identity`` gate 1 everywhere (paper, FMNIST), ``outer`` gate 1 where
``|s| > 1`` (paper, CIFAR), ``clipped`` gate 1 where ``|s| <= 1`` (hard-tanh STE)."""

STE_CODES = {name: code for code, name in enumerate(STES)}
"""The STE as the ops and every kernel take it (``int ste``): a name's index in ``STES``; the C++ ``SpaflSte``
(csrc/spafl_ste.h) and the Triton kernels' ``STE`` constant use the same codes."""


def check_ste(ste: str) -> str:
    """Return ``ste`` unchanged, or raise ``ValueError`` naming the accepted values."""
    if ste not in STES:
        raise ValueError(f"ste must be one of {STES}, got {ste!r}")
    return ste


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for scores and ``dL/dm``: float32 for 16-bit types, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def row_score(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Scores ``s = mean|W_row| - tau``.

    weight: ``[N, ...]`` (any trailing shape; a row is everything after dim 0); threshold: ``[N]``.
    Returns ``[N]`` in ``acc_dtype(weight.dtype)``.
    """
    acc = acc_dtype(weight.dtype)
    rows = weight.reshape(weight.shape[0], -1)
    if weight.device.type == "cpu" and rows.numel() < _ABS_SUM_LIMIT:
        l1 = rows.abs().sum(1, dtype=acc)
    else:  # the L1 norm reduces without materialising |W| (one pass over the weight, no temporary)
        l1 = torch.linalg.vector_norm(rows, ord=1, dim=1, dtype=acc)
    return l1 / max(rows.shape[1], 1) - threshold.to(acc)


# On the CPU, vector_norm(ord=1) costs 2-8x abs().sum() on the paper's small weights (LeNet-5's conv1
# 20x25: 29 vs 3.5 us; fc 500x800: 1.0 vs 0.5 ms, one thread) and wins only once the |W| temporary
# passes ~32 MiB (4096x4096: 119 vs 234 ms). The scores run every step (forward, mask(), density()).
_ABS_SUM_LIMIT = 1 << 23


def ste_gate(score: torch.Tensor, ste: str) -> torch.Tensor:
    """``gate(s)`` of the STE, as 0/1 values in ``score``'s dtype. score: ``[N]`` -> ``[N]``."""
    if ste == "identity":
        return torch.ones_like(score)
    # Written as negations so that a NaN score (a row holding a NaN) has its gate open: see row_mask.
    if ste == "outer":
        return (~(score.abs() <= 1)).to(score.dtype)
    if ste == "clipped":
        return (~(score.abs() > 1)).to(score.dtype)
    raise ValueError(f"ste must be one of {STES}, got {ste!r}")


def is_active(score: torch.Tensor) -> torch.Tensor:
    """``m = 1[s > 0]`` as a bool tensor; a NaN score counts as active. score: ``[N]`` -> ``[N]``.

    A row holding a NaN has a NaN score. Counting it active (and its gate open, ``ste_gate``) lets the
    NaN reach the row's outputs and gradients exactly as in masked dense: pruning never hides a NaN.
    Every backend writes its comparisons this way (``not (s <= 0)``).
    """
    return ~(score <= 0)


def row_mask(score: torch.Tensor) -> torch.Tensor:
    """``m = 1[s > 0]`` (NaN counts as active, see ``is_active``) as 0/1 values in ``score``'s dtype."""
    return is_active(score).to(score.dtype)


def fan_in(weight: torch.Tensor) -> int:
    """Elements per row: ``in_features`` (Linear), ``in_channels/groups * kh * kw`` (Conv2d)."""
    return math.prod(weight.shape[1:])


class Conv2dGeometry(NamedTuple):
    """How a Conv2d slides its kernel: everything but the tensors that the conv ops take, as one bundle.
    The ops and kernels carry it flat (``flat()``, ``of(flat)``): ``int[7]`` ``[stride_h, stride_w, pad_h,
    pad_w, dilation_h, dilation_w, groups]``, the form the C++ ops parse (csrc/spafl_conv.h)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def flat(self) -> list[int]:
        return [*self.stride, *self.padding, *self.dilation, self.groups]

    @classmethod
    def of(cls, flat: Sequence[int]) -> Conv2dGeometry:
        if len(flat) != 7:
            raise ValueError(
                f"conv geometry must be [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups], got {flat}"
            )
        s = [int(v) for v in flat]
        return cls((s[0], s[1]), (s[2], s[3]), (s[4], s[5]), s[6])

    def output_hw(self, hw: Sequence[int], kernel: Sequence[int]) -> tuple[int, int]:
        """Output height and width for an input of ``hw`` and a kernel of ``kernel`` (as ``F.conv2d``)."""
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(hw, kernel, self.stride, self.padding, self.dilation)
        )
