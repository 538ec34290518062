"""FLOP accounting of sparse layers: what a row-skipping kernel executes, the dense count, and the
paper's formula.

Counts are of the matrix products (2 FLOPs per multiply-add), the work that scales with rows; the
O(rows) and O(outputs) element-wise work (scores, bias, masks) is left out of all three counts alike.
For a call with ``M`` output positions per row (batch for Linear, ``batch * H' * W'`` for Conv2d),
``K = fan_in`` elements per row, ``N`` rows, ``A`` active rows and ``P`` pruned rows with an open gate:

- forward: dense ``2MKN``; skipping ``2MKA``
- backward: dense ``2MKN`` for ``dW`` + ``2MKN`` for ``dx`` (when the input needs a gradient);
  skipping ``2MK(A + P)`` for ``dW`` (``P`` rows need their ``dL/dm``) + ``2MKA`` for ``dx``
- paper (the authors' code): ``forward = density * dense forward``, ``backward = 2 * forward``
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .model import sparse_layers
from .semantics import is_active, row_score, ste_gate


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
    positions: int, fan_in: int, rows: int, active: int, open_pruned: int = 0, need_dx: bool = True
) -> LayerFlops:
    """FLOPs of one call. positions: ``M`` outputs per row; fan_in: ``K``; rows: ``N``;
    active: ``A``; open_pruned: ``P`` (pruned rows whose STE gate is open); need_dx: whether the
    layer's input needs a gradient."""
    if not 0 <= active <= rows or not 0 <= open_pruned <= rows - active:
        raise ValueError(f"need 0 <= active ({active}) and active + open_pruned ({open_pruned}) <= rows ({rows})")
    unit = 2 * positions * fan_in  # one row's matrix-product FLOPs
    density = active / rows if rows else 1.0
    dense_forward = unit * rows
    return LayerFlops(
        forward=unit * active,
        backward=unit * (active + open_pruned) + (unit * active if need_dx else 0),
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


class FlopCounter:
    """Counts the FLOPs of every sparse layer call while active (forward hooks)::

        with FlopCounter(model) as counter:
            loss = loss_fn(model(x), target)
        counter.total.train, counter.per_layer["fc1"]

    A layer's input needs a gradient unless it is a leaf tensor without ``requires_grad`` (the data).
    """

    def __init__(self, model: nn.Module):
        self.model = model
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
                positions, layer.fan_in, rows, active, open_pruned, need_dx=x.requires_grad
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
