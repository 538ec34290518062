"""The SpaFL layer semantics every backend meets (docs/DESIGN.md §2), in plain PyTorch.

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


def score_lanes(acc: torch.dtype) -> int:
    """``L``, the lanes of the score's sum (``row_score``) in accumulation dtype ``acc``: 64 for float32, 32
    for float64 (four 512-bit registers' worth, the width the cpp kernel sums in)."""
    return 256 // acc.itemsize


def row_score(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Scores ``s = mean|W_row| - tau``, summed in one fixed order: the definition every backend meets bit
    for bit, so that a threshold exactly at a row's mean ``|w|`` (a tie) prunes the same rows everywhere.

    In the accumulation dtype ``acc = acc_dtype(weight.dtype)`` (every operation rounds to it), with
    ``L = score_lanes(acc)`` lanes and ``n = fan_in``:

    1. lane ``l`` (``0 <= l < L``) sums ``|W_ij|`` for ``j = l, l + L, l + 2L, ... < n`` one at a time in
       increasing ``j``, starting from 0;
    2. the lanes fold by halves: for ``w = L, L/2, ..., 2``: ``lane[l] += lane[l + w/2]`` for ``l < w/2``;
    3. ``s = lane[0] / max(n, 1) - tau`` (an IEEE division, then a subtraction, each rounded once).

    Here: ``|W|`` in chunks of ``L`` columns, one ``[N, L]`` add per chunk in increasing order (a partial last chunk
    adds into the first lanes: the others would add 0, and ``x + 0 == x``), then ``log2(L)`` halving adds, each an
    exactly rounded elementwise op, so the bits equal the C++ loop's (csrc/cpu/rows.cpp ``abs_sum``), the CUDA
    kernel's (csrc/cuda/rows.cuh ``RowScores``) and Triton's (``_score_fwd_kernel``). Differentiable for the
    reference backend: ``ds/dW = sign(W) / n`` (0 on a row whose sum is not finite), ``ds/dtau = -1``.

    weight: ``[N, ...]`` (any trailing shape; a row is everything after dim 0); threshold: ``[N]``.
    Returns ``[N]`` in ``acc``.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or threshold.requires_grad):
        return _RowScore.apply(weight, threshold)
    return _row_mean(weight) - threshold.to(acc_dtype(weight.dtype))


def _row_mean(weight: torch.Tensor) -> torch.Tensor:
    """``mean|W_row|`` in ``row_score``'s order, called without a graph (no_grad or an autograd Function's
    forward). weight: ``[N, ...]`` -> ``[N]`` in acc."""
    acc = acc_dtype(weight.dtype)
    rows_n, n = weight.shape[0], fan_in(weight)
    # Lanes at or past n only ever hold 0 and add nothing (x + 0 == x): fold from the fewest that fold like
    # L lanes, a power of two >= n.
    width = min(score_lanes(acc), 1 << max(n - 1, 0).bit_length())
    # (reshape, not view(N, -1): a weight without rows has no inferable width)
    lanes = weight.reshape(rows_n, n).abs().to(acc)  # |w| converts exactly; a temporary of our own
    full = n // width  # whole chunks of L columns, summed in place below; then the partial tail, if any
    if full == 0:  # n < L (not a power of two): one partial chunk, padded with zeros
        lane = torch.nn.functional.pad(lanes, (0, width - n))
    else:
        parts = lanes[:, : full * width].reshape(rows_n, full, width).unbind(1)
        lane = parts[0]  # 0 + |w| == |w|: the first chunk starts the lanes
        if full > 1:
            lane = lane + parts[1]
            for part in parts[2:]:  # chunk by chunk in increasing order, in place: one rounding per add
                lane.add_(part)
        if n > full * width:
            lane[:, : n - full * width].add_(lanes[:, full * width :])
    while width > 1:
        width //= 2
        low, high = lane.reshape(rows_n, 2, width).unbind(1)
        lane = low + high
    return lane.reshape(rows_n) / max(n, 1)


class _RowScore(torch.autograd.Function):
    """``row_score`` under autograd: the bits from ``_row_mean``, the gradient of ``mean|W| - tau`` (no graph
    of fan_in / L adds). weight: ``[N, ...]``, threshold: ``[N]`` -> ``[N]`` in acc."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        mean = _row_mean(weight)
        ctx.save_for_backward(weight, mean)
        ctx.threshold_dtype = threshold.dtype
        return mean - threshold.to(mean.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mean = ctx.saved_tensors
        grad_weight = grad_threshold = None
        if ctx.needs_input_grad[0]:
            # A row whose sum overflowed or holds a NaN passes no gradient to W (its score is not finite).
            scale = (grad * mean.isfinite()) / max(fan_in(weight), 1)
            grad_weight = scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)) * weight.sgn()
        if ctx.needs_input_grad[1]:
            grad_threshold = (-grad).to(ctx.threshold_dtype)
        return grad_weight, grad_threshold


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
