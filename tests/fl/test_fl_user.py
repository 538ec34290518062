"""A user's own model and data (``--model MODULE:CALLABLE``, ``--dataset MODULE:CALLABLE``) in the in-process
loop, the Python API, Flower's simulation and its deployment engine, and the errors for bad specs."""

import json
import os
import sys

import pytest
import torch

from spafl_fl import RunConfig, Simulation
from spafl_fl.cli import main
from spafl_fl.userspec import build_user_model, load_user_dataset

USER_MODULE = '''
import torch
from torch import nn


class Scaled(nn.Linear):  # a Linear subclass with behaviour of its own: sparsify must leave it dense
    def forward(self, x):
        return 0.5 * super().forward(x)


class Block(nn.Module):  # a residual block with BatchNorm
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def build(num_classes, input_shape):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8), nn.Flatten(),
                         nn.Linear(8 * h * w, 32), nn.ReLU(), Scaled(32, num_classes))


def data():
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = 0.5 * torch.randn(n, 1, 6, 6, generator=g)
        x[:, 0] += 2.0 * y.view(-1, 1, 1).float()
        return x, y

    return (*make(240), *make(90))


def wrong_count():
    return data()[:3]


def negative_labels():
    x, y, xt, yt = data()
    return x, y - 1, xt, yt


def float_labels():
    x, y, xt, yt = data()
    return x, y.float(), xt, yt


def wrong_logits(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(36, num_classes + 1))


def not_a_model(num_classes, input_shape):
    return "model"


NOT_CALLABLE = 3
'''
FLAGS = ["--model", "usermod:build", "--dataset", "usermod:data", "--clients", "3", "--sample", "2", "--rounds", "2",
         "--local-epochs", "1", "--batch-size", "32", "--seed", "1", "--no-baseline", "--no-progress"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A folder holding usermod.py, made the current directory (as a user runs spafl-fl from it)."""
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "usermod", raising=False)
    yield tmp_path
    sys.modules.pop("usermod", None)


def last_record(folder) -> dict:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def test_run_trains_the_users_model_on_the_users_data(user_dir, caplog):
    out = str(user_dir / "run")
    assert main(["run", *FLAGS, "--out", out]) == 0
    record = last_record(out)
    layers = set(record["density"]) - {"total"}
    # every Conv2d and plain Linear is sparse; the Linear subclass stays dense (and is said to)
    assert layers == {"0", "3.conv", "5"}, layers
    assert "layer 7 stays dense" in caplog.text
    assert record["accuracy"] > 50.0  # 3 classes, separable by the mean pixel
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["model"], config["dataset"]) == ("usermod:build", "usermod:data")


def test_python_api_and_skip(user_dir):
    config = RunConfig(model="usermod:build", dataset="usermod:data", clients=3, sample=2, rounds=1, local_epochs=1,
                       measure_baseline=False, skip="3.conv")
    summary = Simulation(config, str(user_dir / "api")).run(progress=False)
    assert summary["rounds"] == 1
    assert set(last_record(user_dir / "api")["density"]) == {"0", "5", "total"}


@pytest.mark.parametrize("flag, spec, message", [
    ("--dataset", "nomodule:data", "cannot import 'nomodule'"),
    ("--dataset", "usermod:missing", "has no attribute 'missing'"),
    ("--dataset", "usermod:NOT_CALLABLE", "not callable"),
    ("--dataset", "usermod:wrong_count", "must return (x_train, y_train, x_test, y_test)"),
    ("--dataset", "usermod:negative_labels", "holds the label -1"),
    ("--dataset", "usermod:float_labels", "must be integer labels"),
    ("--model", "usermod:wrong_logits", "expected logits (2, 3)"),
    ("--model", "usermod:not_a_model", "must return a torch.nn.Module"),
    ("--model", "not a spec", "MODULE:CALLABLE"),
])
def test_bad_specs_are_usage_errors(user_dir, capsys, flag, spec, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *FLAGS, flag, spec, "--out", str(user_dir / "bad")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(user_dir / "bad" / "metrics.jsonl")


def test_skip_is_refused_for_the_papers_models(user_dir, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--model", "lenet5", "--skip", "fc4", "--out", str(user_dir / "x")])
    assert "--skip names layers of a --model MODULE:CALLABLE" in capsys.readouterr().err


def test_checked_data_and_model_reach_the_loop_as_float32_and_int64(user_dir):
    x, y, xt, yt, classes = load_user_dataset("usermod:data")
    assert (x.dtype, y.dtype, classes, tuple(x.shape[1:])) == (torch.float32, torch.int64, 3, (1, 6, 6))
    model = build_user_model("usermod:build", classes, x.shape[1:])
    assert model.training  # the dry run in eval mode leaves the model as it was


@pytest.mark.slow
def test_every_engine_gives_the_same_run(user_dir, monkeypatch):
    pytest.importorskip("flwr")
    # Every process would time its own first-sight kernel choices (rounding differs in the last bits): pin them.
    monkeypatch.setenv("SPAFL_CPU_PATH", "skip")
    monkeypatch.setenv("SPAFL_CPU_CONV_DW", "onednn")
    runs = {engine: str(user_dir / engine) for engine in ("run", "flower", "deploy-local")}
    for engine, out in runs.items():
        flags = [f for f in FLAGS if f != "--no-progress"] if engine == "deploy-local" else FLAGS
        if engine == "deploy-local":
            flags = [*flags[:flags.index("--clients")], "--supernodes", "3", *flags[flags.index("--clients") + 2:]]
        assert main([engine, *flags, "--out", out]) == 0, engine
    records = {engine: last_record(out) for engine, out in runs.items()}
    for engine in ("flower", "deploy-local"):
        assert records[engine]["accuracy"] == pytest.approx(records["run"]["accuracy"], abs=1e-6), engine
        assert set(records["run"]) <= set(records[engine]), engine  # Flower's engines add what Flower carried
