"""``torch`` backend, sparse Conv2d: convolve with the active filters only, scatter into the output.

With ``groups > 1`` a set of filters spans several groups; each group's filters see only that group's
input channels, so the compact convolution runs once per group that has rows in the set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...semantics import Conv2dGeometry, acc_dtype, row_score
from .rows import RowSets, fake, param_grads, scatter_rows, take


def _group_runs(rows: torch.Tensor, n_rows: int, groups: int) -> list[tuple[int, int, int]]:
    """``(group, start, stop)`` per group that has rows in ``rows`` (ascending): ``rows[start:stop]``
    are that group's rows."""
    counts = torch.bincount(rows // (n_rows // groups), minlength=groups).tolist()
    runs, start = [], 0
    for group, count in enumerate(counts):
        if count:
            runs.append((group, start, start + count))
            start += count
    return runs


def _conv_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    geo: Conv2dGeometry,
) -> torch.Tensor:
    """``conv2d(x, W[rows]) + b[rows]``: ``[B, len(rows), H', W']``. rows: ascending filter indices."""
    n_rows, (stride, padding, dilation, groups) = weight.shape[0], geo
    if rows.numel() == n_rows:  # every filter (rows are distinct)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if groups == 1 or rows.numel() == 0:
        b = None if bias is None else bias.index_select(0, rows)
        if rows.numel() == 0:  # a conv with no filters: keep the shape, skip the work
            out_hw = geo.output_hw(x.shape[2:], weight.shape[2:])
            return x.new_zeros(x.shape[0], 0, *out_hw)
        return F.conv2d(x, weight.index_select(0, rows), b, stride, padding, dilation)
    group_in = x.shape[1] // groups
    parts = []
    for group, start, stop in _group_runs(rows, n_rows, groups):
        idx = rows[start:stop]
        b = None if bias is None else bias.index_select(0, idx)
        x_group = x[:, group * group_in : (group + 1) * group_in]
        parts.append(F.conv2d(x_group, weight.index_select(0, idx), b, stride, padding, dilation))
    return torch.cat(parts, dim=1)


def _conv_rows_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    geo: Conv2dGeometry,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``_conv_rows`` without bias: ``(dx [B, C, H, W], dW[rows])``, each None unless asked.

    grad: ``[B, len(rows), H', W']``.
    """

    stride, padding, dilation, groups = geo

    def conv_backward(g, inp, w, grps):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g, inp, w, None, stride, padding, dilation, False, (0, 0), grps, (need_dx, need_dw, False)
        )
        return dx, dw

    if rows.numel() == weight.shape[0]:  # every filter (rows are distinct)
        return conv_backward(grad, x, weight, groups)
    if rows.numel() == 0:
        return (torch.zeros_like(x) if need_dx else None), (weight[:0].clone() if need_dw else None)
    if groups == 1:
        return conv_backward(grad, x, weight.index_select(0, rows), 1)
    group_in = x.shape[1] // groups
    dx = torch.zeros_like(x) if need_dx else None
    dws = []
    for group, start, stop in _group_runs(rows, weight.shape[0], groups):
        channels = slice(group * group_in, (group + 1) * group_in)
        w = weight.index_select(0, rows[start:stop])
        dx_group, dw = conv_backward(grad[:, start:stop], x[:, channels], w, 1)
        if need_dx:
            dx[:, channels] = dx_group
        dws.append(dw)
    return dx, (torch.cat(dws, dim=0) if need_dw else None)


def conv2d_fwd(x, weight, bias, threshold, geometry):
    """x: ``[B, C, H, W]``, weight: ``[N, C/groups, kh, kw]`` -> ``(y [B, N, H', W'], score [N])``."""
    if weight.is_meta:
        return fake("conv2d_fwd", x, weight, bias, threshold, geometry)
    score = row_score(weight, threshold)
    rows = RowSets.from_score(score, ste=None)
    z = _conv_rows(x, weight, bias, rows.active, Conv2dGeometry.of(geometry))
    return scatter_rows(z, 1, rows.active, rows.n_rows), score


def conv2d_bwd(grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params):
    """Gradients of ``conv2d_fwd`` (see ``Kernels``); grad_y: ``[B, N, H', W']``."""
    if weight.is_meta:
        return fake("conv2d_bwd", grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params)
    geo = Conv2dGeometry.of(geometry)
    rows = RowSets.from_score(score, ste if need_params else None)
    dx = x.new_empty(0)
    if need_dx:
        g_active = take(grad_y, 1, rows.active)
        dx, _ = _conv_rows_backward(g_active, x, weight, rows.active, geo, True, False)
    if not need_params:
        # Distinct empty tensors: op outputs must not alias each other.
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    g_graded = take(grad_y, 1, rows.graded)
    _, dweight_graded = _conv_rows_backward(g_graded, x, weight, rows.graded, geo, False, True)
    grad_sum = grad_y.sum((0, 2, 3), dtype=acc_dtype(weight.dtype))
    return (dx, *param_grads(weight, bias, rows, dweight_graded, grad_sum))
