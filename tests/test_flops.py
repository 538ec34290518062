"""FLOP accounting: exact counts of what a skipping kernel does, dense, and the paper's formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spafl_kernels as sk
from spafl_kernels.flops import FLOP_FIELDS, FlopCounter, LayerFlops, layer_flops, live_fan_in, row_counts


def test_layer_flops_counts():
    f = layer_flops(positions=10, fan_in=4, rows=8, active=2, open_pruned=3, need_dx=True)
    unit = 2 * 10 * 4
    assert f.forward == unit * 2 and f.dense_forward == unit * 8
    assert f.backward == unit * (2 + 3) + unit * 2 and f.dense_backward == 2 * unit * 8
    assert f.paper_forward == pytest.approx(0.25 * unit * 8) and f.paper_backward == pytest.approx(2 * f.paper_forward)
    g = layer_flops(10, 4, 8, 2, 0, need_dx=False)
    assert g.backward == unit * 2 and g.dense_backward == unit * 8
    assert (f + g).forward == 2 * unit * 2 and isinstance(f + g, LayerFlops)
    with pytest.raises(ValueError):
        layer_flops(10, 4, 8, 6, 3)


def test_flop_counter_on_a_model():
    torch.manual_seed(0)
    model = sk.sparsify(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)),
                        ste="outer")
    with torch.no_grad():  # conv: rows 0,1 active (|s|<1: gate closed), rows 2,3 pruned, one gate open
        s = torch.tensor([0.5, 0.5, -0.5, -1.5])
        model[0].threshold.copy_(model[0].weight.abs().mean((1, 2, 3)) - s)
    x = torch.randn(3, 2, 5, 5)
    with FlopCounter(model) as counter:
        model(x).sum().backward()
    conv = counter.per_layer["0"]
    positions, fan_in = 3 * 5 * 5, 2 * 9
    assert conv == layer_flops(positions, fan_in, 4, active=2, open_pruned=1, need_dx=False)
    # The Linear's input: channels 2 and 3 of the conv are pruned, so 50 of its 100 columns are zero over
    # the batch and its forward product reads the other 50.
    assert counter.per_layer["2"] == layer_flops(3, 100, 6, active=6, open_pruned=0, need_dx=True, live_fan_in=50)
    assert counter.total.train == conv.train + counter.per_layer["2"].train
    assert counter.total.train < counter.total.dense_train
    with FlopCounter(model) as again:
        pass
    assert again.total.train == 0 and not model[0]._forward_hooks


def test_row_counts_and_flop_fields():
    layer = sk.SparseLinear(3, 4, ste="outer")
    with torch.no_grad():  # mean|W| = 1: s = 0.5 (active), -0.5 (pruned, gate shut), -2 (pruned, gate open), NaN
        layer.weight.fill_(1.0)
        layer.weight[3, 0] = float("nan")
        layer.threshold.copy_(torch.tensor([0.5, 1.5, 3.0, 0.0]))
    assert row_counts(layer) == (2, 1)  # a NaN row counts as active, as in every backend
    assert FLOP_FIELDS == ("forward", "backward", "dense_forward", "dense_backward", "paper_forward", "paper_backward")


def test_live_fan_in_counts_the_inputs_the_kernels_read():
    linear, conv = sk.SparseLinear(16, 3), sk.SparseConv2d(8, 2, 3)
    x = torch.randn(4, 16)
    assert live_fan_in(linear, x) == 16
    x[:, [0, 5]] = 0.0  # 2 of 16 dead: an eighth, skipped
    assert live_fan_in(linear, x) == 14
    x[0, 0] = float("nan")  # a NaN is not zero
    assert live_fan_in(linear, x) == 16  # 1 of 16 dead: under an eighth, not skipped
    assert live_fan_in(linear, torch.zeros(2, 5, 16)) == 0
    assert live_fan_in(linear, torch.zeros(16, 4).t()) == 16  # not contiguous: read whole
    xc = torch.randn(2, 8, 5, 5)
    xc[:, 3] = 0.0
    assert live_fan_in(conv, xc) == 7 * 9
    assert live_fan_in(conv, xc.contiguous(memory_format=torch.channels_last)) == 8 * 9
    assert layer_flops(10, 4, 8, 2, live_fan_in=1).forward == 2 * 10 * 1 * 2
    with pytest.raises(ValueError, match="live_fan_in"):
        layer_flops(10, 4, 8, 2, live_fan_in=5)
