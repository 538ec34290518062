"""Every model: forward and backward shapes, sparse and dense variants."""

import pytest
import torch

import spafl_kernels as sk
from spafl_fl import MODELS, build_model

SHAPES = {"lenet5": (1, 28, 28), "conv4": (3, 32, 32), "resnet18": (3, 32, 32), "vit": (3, 32, 32), "mlp": (1, 28, 28)}


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes(name):
    shape = SHAPES[name]
    model = build_model(name, shape, 10, seed=0)
    layers = dict(sk.sparse_layers(model))
    assert layers, "every model has sparse layers"
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 10)
    out.square().mean().backward()
    for layer in layers.values():
        assert layer.threshold.grad is not None and layer.threshold.grad.shape == layer.threshold.shape
        assert layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize("name", ["lenet5", "mlp", "vit"])
def test_dense_twin_has_the_same_init_and_output(name):
    shape = SHAPES[name]
    sparse = build_model(name, shape, 10, seed=4)
    dense = build_model(name, shape, 10, sparse=False, seed=4)
    assert not list(sk.sparse_layers(dense))
    x = torch.randn(2, *shape)
    # Thresholds start at 0 and every row has weight, so the sparse model starts dense.
    torch.testing.assert_close(sparse(x), dense(x))


def test_vit_sparsifies_every_attention_and_mlp_linear():
    model = build_model("vit", (3, 32, 32), 10)
    names = [name for name, _ in sk.sparse_layers(model)]
    assert len(names) == 6 * 4
    assert all(n.split(".")[-1] in ("to_qkv", "to_out", "0", "2") for n in names)


def test_lenet5_pads_small_inputs():
    model = build_model("lenet5", (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="28x28"):
        build_model("conv4", (1, 8, 8), 10)


@pytest.mark.parametrize("name,head", [("lenet5", "fc4"), ("conv4", "dense3"), ("mlp", "out")])
def test_dense_classifier_keeps_the_last_linear_dense_with_the_same_init(name, head):
    sparse = build_model(name, SHAPES[name], 10, seed=3)
    dense_head = build_model(name, SHAPES[name], 10, seed=3, dense_classifier=True)
    assert isinstance(getattr(sparse, head), sk.SparseLinear)
    assert type(getattr(dense_head, head)) is torch.nn.Linear
    assert head not in dict(sk.sparse_layers(dense_head))
    assert set(dict(sk.sparse_layers(sparse))) - set(dict(sk.sparse_layers(dense_head))) == {head}
    torch.testing.assert_close(getattr(dense_head, head).weight, getattr(sparse, head).weight, rtol=0, atol=0)


def test_classifier_option_is_checked():
    from spafl_fl import RunConfig

    assert RunConfig(classifier="dense").classifier == "dense"
    with pytest.raises(ValueError, match="classifier must be one of sparse, dense"):
        RunConfig(classifier="head")
    with pytest.raises(ValueError, match="name your model's classifier in skip"):
        RunConfig(classifier="dense", model="mymod:build")


def test_a_user_model_runs_without_naming_a_classifier(capsys, tmp_path):
    """The dense-classifier default is the paper's models': a MODULE:CALLABLE model (all layers sparse but --skip)
    needs no --classifier, on the command line, in RunConfig and in the Flower app's run config."""
    from helpers_fl import usage_error

    from spafl_fl import RunConfig
    from spafl_fl.flower_app import app_config, from_run_config

    assert RunConfig().classifier == "dense" and RunConfig(model="mymod:build").classifier == "sparse"
    assert from_run_config({**app_config(), "model": "mymod:build"})[0].classifier == "sparse"
    assert from_run_config(app_config(RunConfig(model="mlp", classifier="sparse")))[0].classifier == "sparse"
    # the command gets past the flags to the import of the missing module
    err = usage_error(capsys, ["run", "--model", "no_such_module_here:build", "--out", str(tmp_path / "r")])
    error = err.strip().splitlines()[-1]
    assert "cannot import 'no_such_module_here'" in error and "classifier" not in error
    err = usage_error(capsys, ["run", "--model", "no_such_module_here:build", "--classifier", "dense",
                               "--out", str(tmp_path / "r")])
    assert "--classifier dense applies to the paper's models" in err
