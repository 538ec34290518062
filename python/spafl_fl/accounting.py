"""What a round costs: bits on the wire and training FLOPs.

Bits: every tensor counts ``numel * dtype width`` (thresholds at their dtype; FedAvg's full state,
buffers included). FLOPs: ``spafl_kernels.flops.layer_flops`` per Linear/Conv2d call, with the rows a
skipping kernel executes, the dense count and the paper's formula; dense layers count in all three
as fully active, and so do sparse layers on the ``reference`` backend in the executed count (masked
dense skips nothing; the paper's formula still applies the density). Only those matrix products are
counted (as in ``spafl_kernels.flops``). The executed count skips rows only: the kernels also skip input
columns/channels that are zero over the batch (``spafl_kernels.flops.live_fan_in``), which depends on the
data, and a plan sees none, so the savings reported here are a lower bound.

Counting never runs inside a timed training step: ``FlopPlan`` learns once, by one probe forward with
hooks, each layer's output positions per sample and whether its input needs a gradient; a step then
costs only a row count per sparse layer (``FlopPlan.step``), taken before the step's forward, i.e. on
the very weights and thresholds that forward uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from spafl_kernels import sparse_layers
from spafl_kernels.backends import resolve_backend
from spafl_kernels.flops import LayerFlops, layer_flops, row_counts
from spafl_kernels.modules import SparseLayer


def tensor_bits(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bits of a message of tensors: ``sum numel * element bits``."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def threshold_count(model: nn.Module) -> int:
    """Number of thresholds (rows of every sparse layer)."""
    return sum(layer.threshold.numel() for _, layer in sparse_layers(model))


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state FedAvg sends for this architecture: every parameter and buffer but the thresholds."""
    skip = {f"{name}.threshold" if name else "threshold" for name, _ in sparse_layers(model)}
    return {k: v for k, v in model.state_dict().items() if k not in skip}


@dataclass
class _Call:
    name: str
    op: str  # "linear" or "conv2d"
    sparse: bool
    positions_per_sample: int
    fan_in: int
    rows: int
    need_dx: bool


class FlopPlan:
    """Per-step FLOP counting for every Linear/Conv2d (sparse or dense) of one architecture.

    ``FlopPlan(model, sample)`` runs one forward of ``model`` on ``sample`` (``[b, C, H, W]``) with
    autograd on (a layer's input needs a gradient unless it is the data, and only autograd tells), in
    eval mode so BatchNorm statistics stay put. ``plan.step(model, batch_size)`` then gives one
    training step's ``LayerFlops`` per layer for any model of that architecture (layers are found by
    name), with the rows active now.
    """

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        self.calls: list[_Call] = []
        batch = sample.shape[0]
        handles = []

        def hook(name):
            def record(layer, inputs, output):
                rows = layer.weight.shape[0]
                op = "linear" if isinstance(layer, nn.Linear) else "conv2d"
                self.calls.append(_Call(name, op, isinstance(layer, SparseLayer), output.numel() // rows // batch,
                                        layer.weight[0].numel(), rows, bool(inputs[0].requires_grad)))
            return record

        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                handles.append(module.register_forward_hook(hook(name)))
        was_training = model.training
        try:
            model.eval()
            model(sample)
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def step(self, model: nn.Module, batch_size: int) -> dict[str, LayerFlops]:
        """FLOPs per layer of one training step of ``model`` on ``batch_size`` samples."""
        modules = dict(model.named_modules())
        counts: dict[str, tuple[int, int]] = {}
        result: dict[str, LayerFlops] = {}
        for call in self.calls:
            positions = call.positions_per_sample * batch_size
            dense = layer_flops(positions, call.fan_in, call.rows, call.rows, 0, need_dx=call.need_dx)
            flops = dense
            if call.sparse:
                layer = modules[call.name]
                if call.name not in counts:
                    counts[call.name] = row_counts(layer)
                flops = layer_flops(positions, call.fan_in, call.rows, *counts[call.name], need_dx=call.need_dx)
                if _masked_dense(layer, call.op):
                    # The masked-dense compute multiplies by the mask and skips nothing: it executes the
                    # dense count; only the paper's formula sees the density.
                    flops = replace(dense, paper_forward=flops.paper_forward, paper_backward=flops.paper_backward)
            result[call.name] = result.get(call.name, LayerFlops()) + flops
        return result


def _masked_dense(layer: SparseLayer, op: str) -> bool:
    """Whether ``layer`` runs on the ``reference`` backend (masked dense), ``auto`` and
    ``SPAFL_BACKEND`` resolved as its forward resolves them."""
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    return resolve_backend(layer.backend, op, w.device.type, w.dtype, groups) == "reference"


def total_flops(per_layer: Mapping[str, LayerFlops]) -> LayerFlops:
    return sum(per_layer.values(), LayerFlops())


@torch.no_grad()
def authors_flops(plan: FlopPlan, model: nn.Module, num_train: int, epochs: int, batches_per_epoch: int) -> float:
    """One client's training FLOPs for one round, counted as the authors' code counts them
    (``FLOP_count_weight`` + ``FLOP_count_threshold`` of its ``Client_Class``), not as executed:

    - one FLOP per multiply-add; forward = ``epochs * num_train * sum over sparse layers of
      density * rows * fan_in * output positions``, with each layer's density taken at the END of
      the round and applied to the whole round; backward = 2 x forward (input gradients counted even
      where the input is the data);
    - plus ``thresholds * batches_per_epoch`` (the code's ``len(tr_loader)``: one epoch's batches,
      whatever the number of epochs) plus the sparse layers' weight count (the threshold update).

    Only sparse layers count (layers the paper keeps dense are left out, as in the code). A model
    without sparse layers (FedAvg, Local) counts every Linear/Conv2d at density 1 and no threshold
    terms. The authors then average the run's total over ALL clients, sampled or not
    (``Simulator.FLOP_cal``): ``authors_flops_per_client`` in the records.
    """
    modules = dict(model.named_modules())
    layers = dict(sparse_layers(model))
    forward = 0.0
    for call in plan.calls:
        if layers and not call.sparse:
            continue
        ratio = modules[call.name].density() if call.sparse else 1.0
        forward += ratio * call.rows * call.fan_in * call.positions_per_sample
    forward *= epochs * num_train
    extra = sum(layer.threshold.numel() * batches_per_epoch + layer.weight.numel() for layer in layers.values())
    return float(3 * forward + extra)
