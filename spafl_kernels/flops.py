"""FLOP accounting of sparse layers: what a row-skipping kernel executes, the dense count, and the
paper's formula.

Counts are of the matrix products (2 FLOPs per multiply-add), the work that scales with rows; the
O(rows) and O(outputs) element-wise work (scores, bias, masks) is left out of all three counts alike.
For a call with ``M`` output positions per row (batch for Linear, ``batch * H' * W'`` for Conv2d),
``K = fan_in`` elements per row, ``N`` rows, ``A`` active rows and ``P`` pruned rows with an open gate:

- forward: dense ``2MKN``; skipping ``2MK'A``, where ``K'`` (``live_fan_in``) leaves out the input columns
  (Linear) or channels (Conv2d) that are zero over the whole batch, where the kernels skip them
  (``live_fan_in``: behind a pruned row and ReLU such inputs are zero)
- backward: dense ``2MKN`` for ``dW`` + ``2MKN`` for ``dx`` (when the input needs a gradient);
  skipping ``2MK'(A + P)`` for ``dW`` (``P`` rows need their ``dL/dm``; dead inputs add nothing to
  ``G``) + ``2MKA`` for ``dx`` (the layer before needs ``dx`` on the dead inputs too)
- paper (the authors' code): ``forward = density * dense forward``, ``backward = 2 * forward``
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .semantics import is_active, row_score, ste_gate
from .whole_model import sparse_layers


@dataclass
class LayerFlops:
    """FLOPs of one or more layer calls (adds up with ``+``)."""

    forward: int = 0
    backward: int = 0
    dense_forward: int = 0
    dense_backward: int = 0
    paper_forward: float = 0.0
    paper_backward: float = 0.0

    @property
    def train(self) -> int:
        """Forward + backward, as the skipping kernels execute it."""
        return self.forward + self.backward

    @property
    def dense_train(self) -> int:
        return self.dense_forward + self.dense_backward

    @property
    def paper_train(self) -> float:
        return self.paper_forward + self.paper_backward

    def __add__(self, other: LayerFlops) -> LayerFlops:
        return LayerFlops(*(getattr(self, name) + getattr(other, name) for name in FLOP_FIELDS))


FLOP_FIELDS = tuple(f.name for f in fields(LayerFlops))
"""The counts a ``LayerFlops`` holds, in order (what a record or a message of FLOPs carries)."""


def layer_flops(
    positions: int, fan_in: int, rows: int, active: int, open_pruned: int = 0, need_dx: bool = True,
    live_fan_in: int | None = None,
) -> LayerFlops:
    """FLOPs of one call. positions: ``M`` outputs per row; fan_in: ``K``; rows: ``N``;
    active: ``A``; open_pruned: ``P`` (pruned rows whose STE gate is open); need_dx: whether the
    layer's input needs a gradient; live_fan_in: ``K'``, the elements per row the forward product and
    ``G`` read (``fan_in`` when None)."""
    if not 0 <= active <= rows or not 0 <= open_pruned <= rows - active:
        raise ValueError(f"need 0 <= active ({active}) and active + open_pruned ({open_pruned}) <= rows ({rows})")
    live_fan_in = fan_in if live_fan_in is None else live_fan_in
    if not 0 <= live_fan_in <= fan_in:
        raise ValueError(f"need 0 <= live_fan_in ({live_fan_in}) <= fan_in ({fan_in})")
    unit = 2 * positions * fan_in  # one row's matrix-product FLOPs
    density = active / rows if rows else 1.0
    dense_forward = unit * rows
    return LayerFlops(
        forward=2 * positions * live_fan_in * active,
        backward=2 * positions * live_fan_in * (active + open_pruned) + (unit * active if need_dx else 0),
        dense_forward=dense_forward,
        dense_backward=dense_forward * (2 if need_dx else 1),
        paper_forward=density * dense_forward,
        paper_backward=2 * density * dense_forward,
    )


def row_counts(layer) -> tuple[int, int]:
    """``(active, open_pruned)`` rows of a sparse layer now: the ``active`` and ``open_pruned`` arguments of
    ``layer_flops`` (a NaN score counts as active with an open gate, as in every backend)."""
    with torch.no_grad():
        score = row_score(layer.weight, layer.threshold)
        mask = is_active(score)
        gate = ste_gate(score, layer.ste) != 0
        return int(mask.sum()), int((gate & ~mask).sum())


MIN_PLANES_TO_SKIP = 8
"""Dead inputs are skipped only in layers with at least this many input columns (channels) ..."""
MIN_DEAD_FRACTION = 1 / 8
"""... when at least this fraction of them is dead (csrc/cpu/rows.h ``live_inputs``: below it, the gather
costs more than it saves)."""


def live_fan_in(layer, x: torch.Tensor) -> int:
    """Elements per row of ``layer`` that its forward product reads on input ``x``: ``fan_in`` less the
    input columns (Linear, x ``[*, K]``) or channels (Conv2d, x ``[B, C, H, W]``, ``groups == 1``) that are
    zero over the whole batch, where the skipping kernels drop them: x contiguous, at least
    ``MIN_PLANES_TO_SKIP`` of them, at least ``MIN_DEAD_FRACTION`` dead (a NaN counts as non-zero)."""
    conv = layer.weight.dim() == 4
    planes = x.shape[1] if conv else x.shape[-1]
    x = x if conv else x.reshape(-1, planes)  # as the Linear op sees it
    if getattr(layer, "groups", 1) != 1 or not x.is_contiguous() or planes < MIN_PLANES_TO_SKIP:
        return layer.fan_in
    with torch.no_grad():
        nonzero = x != 0
        live = int((nonzero.transpose(0, 1).reshape(planes, -1).any(1) if conv else nonzero.any(0)).sum())
    if planes - live < MIN_DEAD_FRACTION * planes:
        return layer.fan_in
    return layer.fan_in // planes * live


class FlopCounter:
    """Counts the FLOPs of every sparse layer call while active (forward hooks)::

        with FlopCounter(model) as counter:
            loss = loss_fn(model(x), target)
        counter.total.train, counter.per_layer["fc1"]

    A layer's input needs a gradient unless it is a leaf tensor without ``requires_grad`` (the data). The
    forward and ``G`` counts leave out the dead inputs of each call (``live_fan_in``; the kernels keep
    them when dL/dy holds a NaN or infinity, which this count does not see); ``dead_inputs=False`` counts
    rows only, as ``spafl_fl``'s per-step ``FlopPlan`` does (it learns shapes once and sees no data).
    """

    def __init__(self, model: nn.Module, dead_inputs: bool = True):
        self.model = model
        self.dead_inputs = dead_inputs
        self.layers = dict(sparse_layers(model))
        self.per_layer: dict[str, LayerFlops] = {name: LayerFlops() for name in self.layers}
        self._handles: list = []

    def _hook(self, name):
        def hook(layer, inputs, output):
            x = inputs[0]
            rows = layer.weight.shape[0]
            positions = output.numel() // rows if rows else 0
            active, open_pruned = row_counts(layer)
            self.per_layer[name] += layer_flops(
                positions, layer.fan_in, rows, active, open_pruned, need_dx=x.requires_grad,
                live_fan_in=live_fan_in(layer, x) if self.dead_inputs else None,
            )

        return hook

    def __enter__(self) -> FlopCounter:
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def total(self) -> LayerFlops:
        return sum(self.per_layer.values(), LayerFlops())
