"""The whole-model benchmark (``spafl-bench --models``): the candidates compute what they claim."""

from __future__ import annotations

import json

import pytest
import torch

import spafl_kernels as sk
from spafl_kernels.bench import cli
from spafl_kernels.bench.layers import LAYERS, make_case
from spafl_kernels.bench.masked import PaperMaskedLayer, paper_masked
from spafl_kernels.bench.models import MODELS, SETUPS, candidate_models, run_models, set_densities, static_model
from spafl_kernels.zoo import build_model


@pytest.mark.parametrize("name", MODELS)
def test_static_model_is_the_sparse_model_cut_to_its_rows(name):
    setup = SETUPS[name]
    model = build_model(name, setup.input_shape, setup.num_classes, ste=setup.ste, backend="torch", seed=0).eval()
    active = set_densities(model, 0.3)
    for layer_name, layer in sk.sparse_layers(model):
        assert int(layer.mask().sum()) == active[layer_name] == max(1, round(0.3 * layer.weight.shape[0]))
    x = torch.randn(2, *setup.input_shape)
    static = static_model(model)
    assert not list(sk.sparse_layers(static))
    torch.testing.assert_close(static(x), model(x))


def test_candidates_start_from_the_same_weights():
    models, sparse, (x, target) = candidate_models("mlp", 1.0, ["masked", "torch"])
    assert x.shape == (SETUPS["mlp"].batch, *SETUPS["mlp"].input_shape) and target.shape == x.shape[:1]
    outputs = {name: model(x) for name, model in models.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["dense"], msg=name)  # density 1: every candidate = dense
    wrapped = [m for m in models["masked"].modules() if isinstance(m, PaperMaskedLayer)]
    assert [w.layer for w in wrapped] == [layer for _, layer in sk.sparse_layers(models["masked"])]  # every one


def test_run_models_rows():
    rows = run_models(["mlp"], [0.5], ["masked", "torch"], reps=1)
    assert [r["candidate"] for r in rows] == ["dense", "static", "masked", "torch"]
    torch_row = rows[-1]
    assert torch_row["density"] == 0.5 and 0.4 < torch_row["weight_density"] < 0.6
    assert torch_row["vs_dense"] > 0 and torch_row["of_static"] > 0 and torch_row["flops_vs_dense"] < 1


@pytest.mark.parametrize("classifier", [None, "sparse", "dense"])
def test_cli_models_and_density_from(tmp_path, capsys, classifier):
    """A run's last densities are timed as the 'profile' row, with its classifier as the run had it (a run from
    before the setting pruned it)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "mlp", **({"classifier": classifier} if classifier else {})}))
    dense = classifier == "dense"
    layers = {name: 0.5 for name, _ in sk.sparse_layers(build_model("mlp", (1, 28, 28), 10, dense_classifier=dense))}
    assert ("out" in layers) is not dense
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "density": {**layers, "total": 0.5}}) + "\n")
    out = tmp_path / "models.json"
    cli.main(["--models", "mlp", "--densities", "1", "--backends", "torch", "--reps", "1", "--threads", "1",
                "--density-from", str(run), "--json", str(out), "--markdown", str(tmp_path / "m.md")])
    rows = json.loads(out.read_text())["rows"]
    assert {r["density"] for r in rows} == {1.0, "profile"}
    assert "## Targets" in (tmp_path / "m.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["--models", "lenet5", "--density-from", str(run)])  # the run trained mlp
    assert "add it to --models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--density-from", str(run)])
    assert "--density-from needs --models" in capsys.readouterr().err


@pytest.mark.parametrize("ste", sk.STES)
@pytest.mark.parametrize("layer", ["lenet5-fc2", "lenet5-conv2", "conv4-conv1"])
def test_masked_candidate_is_the_reference_away_from_ties(layer, ste):
    """The ``masked`` baseline (the paper's code: PyTorch's ``abs().mean()`` score) gives the reference's outputs
    and gradients of x, weight, bias and threshold where no threshold sits on a row's mean."""
    case = make_case(layer, 0.5, ste, dtype=torch.float64)
    conv = None if LAYERS[layer].op == "linear" else LAYERS[layer].conv
    results = []
    for compute in ("masked", "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (case.x, case.weight, case.bias, case.threshold)]
        if compute == "masked":
            y = paper_masked(*leaves, ste, conv)
        elif conv is None:
            y = sk.sparse_linear(*leaves, ste=ste, backend="reference")
        else:
            y = sk.sparse_conv2d(*leaves, ste=ste, backend="reference", **conv)
        grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                                                           dtype=y.dtype))
        results.append((y, *grads))
    for got, want, what in zip(*results, ("y", "dx", "dweight", "dbias", "dthreshold")):
        torch.testing.assert_close(got, want, msg=what)
