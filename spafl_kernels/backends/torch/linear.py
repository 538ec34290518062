"""``torch`` backend, sparse Linear: gather the active rows, run the dense op on them, scatter."""

from __future__ import annotations

import torch.nn.functional as F

from ...semantics import acc_dtype, row_score
from .rows import RowSets, fake, param_grads, scatter_rows, take


def linear_fwd(x, weight, bias, threshold):
    """x: ``[M, K]``, weight: ``[N, K]``, bias/threshold: ``[N]`` -> ``(y [M, N], score [N])``."""
    if weight.is_meta:
        return fake("linear_fwd", x, weight, bias, threshold)
    score = row_score(weight, threshold)
    rows = RowSets.from_score(score, ste=None)
    w = take(weight, 0, rows.active)
    b = None if bias is None else take(bias, 0, rows.active)
    y = scatter_rows(F.linear(x, w, b), 1, rows.active, rows.n_rows)
    return y, score


def linear_bwd(grad_y, x, weight, bias, score, ste, need_dx, need_params):
    """Gradients of ``linear_fwd`` (see ``Kernels``); grad_y: ``[M, N]``."""
    if weight.is_meta:
        return fake("linear_bwd", grad_y, x, weight, bias, score, ste, need_dx, need_params)
    rows = RowSets.from_score(score, ste if need_params else None)
    dx = x.new_empty(0)
    if need_dx:
        dx = take(grad_y, 1, rows.active) @ take(weight, 0, rows.active)
    if not need_params:
        # Distinct empty tensors: op outputs must not alias each other.
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    g_graded = take(grad_y, 1, rows.graded)  # [M, R]
    grad_sum = grad_y.sum(0, dtype=acc_dtype(weight.dtype))
    return (dx, *param_grads(weight, bias, rows, g_graded.t() @ x, grad_sum))
