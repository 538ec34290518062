"""Row bookkeeping shared by the ``torch`` backend's ops: which rows are active, which rows need a
weight gradient, and how the per-row pieces come together into ``dW, db, dtau`` (docs/DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...semantics import STES, acc_dtype, fan_in, is_active, ste_gate


@dataclass
class RowSets:
    """Index sets over the ``N`` rows of a layer (1-D int64 tensors, ascending)."""

    n_rows: int
    mask: torch.Tensor  # [N] bool, m_i
    active: torch.Tensor  # rows with m_i = 1
    # Rows whose weight gradient G_i is needed: active rows (for dW) and pruned rows with an open
    # gate (for dL/dm_i = <G_i, W_i> + b_i * sum g_i). Empty in the forward pass.
    graded: torch.Tensor
    gate: torch.Tensor  # [N] 0/1 in the score's dtype; zero in the forward pass

    @classmethod
    def from_score(cls, score: torch.Tensor, ste: int | None) -> RowSets:
        """score: ``[N]``. ``ste=None``: only ``active`` is needed (forward, or backward for dx)."""
        mask = is_active(score)
        # nonzero() synchronises with the device: this backend trades that for plain PyTorch.
        active = mask.nonzero().squeeze(1)
        if ste is None:
            return cls(score.numel(), mask, active, active[:0], torch.zeros_like(score))
        gate = ste_gate(score, STES[ste])
        graded = (mask | (gate != 0)).nonzero().squeeze(1)
        return cls(score.numel(), mask, active, graded, gate)


def fake(op: str, *args):
    """``ops.FAKE_KERNELS[op](*args)``: on meta tensors which rows are active cannot be known, only shapes."""
    from ... import ops  # (ops imports the backends)

    return ops.FAKE_KERNELS[op](*args)


def take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)``, without the copy when ``index`` (ascending, distinct: a ``RowSets``
    list) is every row."""
    return t if index.numel() == t.shape[dim] else t.index_select(dim, index)


def scatter_rows(values: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> torch.Tensor:
    """A tensor like ``values`` but ``size`` long along ``dim``: ``values`` at ``index``, 0 elsewhere."""
    if values.shape[dim] == size:
        return values
    shape = list(values.shape)
    shape[dim] = size
    return values.new_zeros(shape).index_copy_(dim, index, values)


def param_grads(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: RowSets,
    dweight_graded: torch.Tensor,
    grad_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dW, dL/db, dL/dtau)``; ``dL/db`` is empty when there is no bias.

    weight: ``[N, ...]``; dweight_graded: ``[R, ...]``, the dense weight gradient ``G`` of the rows
    ``rows.graded`` (consumed: it is updated in place); grad_sum: ``[N]``, ``dL/dy`` summed over batch
    (and space), accumulation dtype.
    """
    acc = acc_dtype(weight.dtype)
    n_graded = rows.graded.numel()
    row_fan_in = fan_in(weight)
    g_flat = dweight_graded.reshape(n_graded, row_fan_in)
    w_flat = take(weight, 0, rows.graded).reshape(n_graded, row_fan_in)
    # dL/dm_i = sum(g_i * (z_i + b_i)) = <G_i, W_i> + b_i * sum(g_i): no saved output needed.
    # A batched dot product reads G and W once and materialises nothing of their size.
    dm = torch.bmm(g_flat.unsqueeze(1), w_flat.unsqueeze(2)).view(n_graded).to(acc)
    if bias is not None:
        dm = dm + take(bias, 0, rows.graded).to(acc) * take(grad_sum, 0, rows.graded)
    gated_dm = take(rows.gate, 0, rows.graded) * dm
    dthreshold = scatter_rows(-gated_dm, 0, rows.graded, rows.n_rows).to(weight.dtype)

    # Dense part: G_i on active rows only (graded pruned rows contribute through the STE alone).
    graded_mask = take(rows.mask, 0, rows.graded)
    if n_graded != rows.active.numel():
        g_flat.mul_(graded_mask.to(g_flat.dtype).unsqueeze(1))
    # STE part: gate_i * dL/dm_i * sign(W_ij) / fan_in, added in place.
    scale = (gated_dm / max(row_fan_in, 1)).to(weight.dtype).unsqueeze(1)
    g_flat.addcmul_(w_flat.sign(), scale)
    dweight = scatter_rows(g_flat.reshape(dweight_graded.shape), 0, rows.graded, rows.n_rows)
    dbias = weight.new_empty(0) if bias is None else (grad_sum * rows.mask).to(bias.dtype)
    return dweight, dbias, dthreshold
