"""export_dense: the exported plain model gives the sparse model's outputs (the oracle's float tolerance) and is
physically smaller, on the paper's models, an MLP with GELU, densities 1/0.5/0.1 and a layer with every row pruned."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from oracle import _assert_within_oracle_error
from torch import nn

import spafl_kernels as sk
from spafl_kernels.bench.models import set_densities
from spafl_kernels.export import export_dense_with_report, standalone_source
from spafl_kernels.zoo import build_model

# Small inputs keep the suite quick on 2 cores; each model still runs every op it has at full size.
SHAPES = {"lenet5": (1, 28, 28), "conv4": (3, 28, 28), "resnet18": (3, 16, 16), "vit": (3, 8, 8)}
ALL_PRUNED = {"lenet5": "conv2", "conv4": "conv2", "resnet18": "layer1.0.conv1", "vit": "blocks.0.mlp.0",
              "gelu_mlp": "0"}


def gelu_mlp() -> nn.Module:
    """An MLP with biases, GELU, dropout and a BatchNorm1d before a ReLU and the last layer."""
    return nn.Sequential(
        sk.SparseLinear(64, 48), nn.GELU(), nn.Dropout(0.3), sk.SparseLinear(48, 40), nn.BatchNorm1d(40), nn.ReLU(),
        sk.SparseLinear(40, 32), nn.GELU(approximate="tanh"), sk.SparseLinear(32, 10))


def make(name: str, density, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The sparse model (eval, BatchNorm statistics randomised so that a pruned channel's constant is not 0) and
    an input batch. ``density``: a float, or ``"all"`` (density 0.5 with every row of one layer pruned)."""
    torch.manual_seed(seed)
    if name == "gelu_mlp":
        model, x = gelu_mlp(), torch.randn(3, 64)
    else:
        model = build_model(name, SHAPES[name], 10, seed=seed)
        x = torch.randn(3, *SHAPES[name])
    set_densities(model, 0.5 if density == "all" else density, seed=seed)
    if density == "all":
        layer = model.get_submodule(ALL_PRUNED[name])
        with torch.no_grad():
            layer.threshold.fill_(1e3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
    return model.eval(), x


def reference(model: nn.Module, dtype) -> nn.Module:
    """``model`` on the masked-dense ``reference`` backend (the oracle) in ``dtype``."""
    oracle = copy.deepcopy(model).to(dtype)
    for _, layer in sk.sparse_layers(oracle):
        layer.backend = "reference"
    return oracle


def assert_exact(model: nn.Module, exported: nn.Module, x: torch.Tensor) -> None:
    """The export's float32 error against the float64 oracle is at most twice the float32 oracle's plus 1e-6."""
    with torch.no_grad():
        ref64 = {"y": reference(model, torch.float64)(x.double())}
        ref32 = {"y": reference(model, torch.float32)(x)}
        out = {"y": exported(x)}
    _assert_within_oracle_error(out, ref32, ref64, torch.float32, 1e-6)


MODELS = ["lenet5", "conv4", "resnet18", "vit", "gelu_mlp"]


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, "all"])
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_sparse_model(name, density):
    model, x = make(name, density)
    exported, report = export_dense_with_report(model, x[:2])
    assert not any(isinstance(m, sk.SparseConv2d | sk.SparseLinear) for m in exported.modules())
    assert all(type(m).__module__.startswith("torch.") for m in exported.modules())
    assert_exact(model, exported, x)  # another batch size than the example's
    assert_exact(model, exported, x[:1])
    sparse_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("threshold"))
    assert report.params_before == sparse_params
    assert report.params_after == sum(p.numel() for p in exported.parameters())
    if density == 1.0:
        assert report.params_after == report.params_before and not report.kept
    else:
        assert report.params_after < report.params_before
        assert report.flops_after < report.flops_before
    json.dumps(report.to_dict())
    assert "total" in str(report) and "| **total**" in report.markdown()
    # The architecture as torch-only source rebuilds the same model.
    namespace = {}
    exec(standalone_source(exported), namespace)
    rebuilt = namespace["ExportedModel"]()
    rebuilt.load_state_dict(exported.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), exported(x))


@pytest.mark.parametrize("name", ["lenet5", "gelu_mlp"])
def test_chain_models_shrink_below_0_7x_at_half_density(name):
    if name == "gelu_mlp":
        model = build_model("mlp", (1, 28, 28), 10, seed=0)
        set_densities(model, 0.5)
        x = torch.randn(2, 1, 28, 28)
    else:
        model, x = make(name, 0.5)
    _, report = export_dense_with_report(model.eval(), x)
    assert report.params_after <= 0.7 * report.params_before
    # Nothing scattered back but the logits (the model's output keeps its width).
    assert len(report.kept) == 1 and "the model's output" in report.kept[0]


def test_pruned_rows_and_their_columns_are_gone():
    model, x = make("lenet5", 0.5)
    exported, report = export_dense_with_report(model, x)
    conv2, fc3 = model.conv2, model.fc3
    kept2 = int(conv2.mask().sum())
    assert exported.conv2.weight.shape == (kept2, int(model.conv1.mask().sum()), 5, 5)
    # Flatten: every pruned conv2 channel takes its 4x4 block of fc3's columns with it.
    assert exported.fc3.weight.shape == (int(fc3.mask().sum()), kept2 * 16)
    row = {x.name: x for x in report.layers}["fc3"]
    assert (row.rows_kept, row.inputs_kept) == (int(fc3.mask().sum()), kept2 * 16)


def test_batchnorm_constant_is_folded_where_exact_and_kept_under_padding():
    # Conv4: valid convolutions, the constant of a pruned channel after BN folds into the next conv's bias.
    model, x = make("conv4", 0.5)
    exported, report = export_dense_with_report(model, x)
    notes = {x.name: x.notes for x in report.layers}
    assert any("folded" in n for n in notes["conv2"]) and exported.conv2.bias is not None
    assert exported.conv2.weight.shape[1] == int(model.conv1.mask().sum())
    assert not any("padding" in k for k in report.kept)
    # ResNet-18: 3x3 convolutions with zero padding: the constant does not hold at the borders; put back.
    model, x = make("resnet18", 0.5)
    _, report = export_dense_with_report(model, x)
    assert any("padding" in k and "non-zero" in k for k in report.kept)
    assert any("for add" in k for k in report.kept)


def test_every_row_of_a_layer_pruned_keeps_one_zero_row():
    model, x = make("lenet5", "all")
    exported, report = export_dense_with_report(model, x)
    assert exported.conv2.weight.shape[0] == 1 and not exported.conv2.weight.any()
    assert {x.name: x for x in report.layers}["conv2"].rows_kept == 0
    assert exported.fc3.weight.shape[1] == 16


def test_standalone_source_and_torch_export_rebuild_without_this_package(tmp_path):
    model, x = make("conv4", 0.5)
    exported, _ = export_dense_with_report(model, x)
    source = standalone_source(exported)
    assert "spafl_kernels" not in source and "spafl_fl" not in source
    (tmp_path / "arch.py").write_text(source)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(x, tmp_path / "x.pt")
    torch.save(exported(x).detach(), tmp_path / "y.pt")
    script = (
        "import sys; sys.modules['spafl_kernels'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import torch; from safetensors.torch import load_file; import arch\n"
        "m = arch.ExportedModel(); m.load_state_dict(load_file(sys.argv[1] + '/w.safetensors')); m.eval()\n"
        "x = torch.load(sys.argv[1] + '/x.pt'); y = torch.load(sys.argv[1] + '/y.pt')\n"
        "assert torch.equal(m(x), y), (m(x) - y).abs().max()\n"
        "ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=1024)},))\n"
        "torch.export.save(ep, sys.argv[1] + '/m.pt2')\n"
        "assert torch.equal(torch.export.load(sys.argv[1] + '/m.pt2').module()(x), y)\n"
        "assert not any(k.startswith('spafl') for k in sys.modules if sys.modules[k] is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sk.SparseLinear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot trace"):
        export_dense_with_report(Branchy(), torch.randn(2, 4))


def test_conv_bias_groups_padded_avg_pool_and_a_shared_layer():
    """Less common paths: conv biases, a grouped conv (its input is put back in full), avg pooling with zero padding
    counted (a constant channel is put back first), BatchNorm before it, and one Linear called twice."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = sk.SparseConv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.c2 = sk.SparseConv2d(8, 8, 3, groups=2)
            self.c3 = sk.SparseConv2d(8, 6, 1)
            self.fc = sk.SparseLinear(6 * 3 * 3, 6 * 3 * 3)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            y = nn.functional.avg_pool2d(self.c3(self.c2(y)), 2, padding=1)
            y = y.flatten(1)
            return self.fc(torch.relu(self.fc(y)))

    torch.manual_seed(0)
    model = Net()
    set_densities(model, 0.5)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    exported, report = export_dense_with_report(model, x[:2])
    assert_exact(model, exported, x)
    assert report.params_after < report.params_before
