"""The spafl-fl command end to end in a temporary folder."""

import json
import os

import pytest
import torch

from spafl_fl import SUMMARY_KEYS
from spafl_fl.cli import main
from spafl_kernels.backends import resolve_backend

FLAGS = ["--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample", "2", "--rounds", "2",
         "--local-epochs", "1", "--batch-size", "64", "--lr", "0.05", "--alpha", "0.5", "--no-progress"]


def _with(flags, name, value):
    """``flags`` with the value after ``name`` replaced."""
    i = flags.index(name)
    return [*flags[:i + 1], value, *flags[i + 2:]]


def test_run_then_compare(tmp_path, capsys):
    spafl, fedavg = str(tmp_path / "spafl"), str(tmp_path / "fedavg")
    assert main(["run", *FLAGS, "--out", spafl]) == 0
    report = capsys.readouterr().out
    for phrase in ("accuracy", "density", "vs FedAvg", "vs dense", "masked dense (reference)"):
        assert phrase in report
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "density.png", "bits.png",
                 "time.png", "checkpoint.json"):
        assert os.path.isfile(os.path.join(spafl, name)), name
    with open(os.path.join(spafl, "summary.json")) as f:
        summary = json.load(f)
    assert tuple(summary) == SUMMARY_KEYS and summary["rounds"] == 2 and summary["algorithm"] == "spafl"
    with open(os.path.join(spafl, "config.json")) as f:
        config = json.load(f)
    auto = resolve_backend("auto", "linear", "cpu", torch.float32, 1)  # cpp when built, else torch
    assert config["model"] == "mlp" and config["resolved_backend"] == auto
    assert main(["run", *FLAGS, "--algorithm", "fedavg", "--out", fedavg]) == 0
    capsys.readouterr()
    assert main(["compare", spafl, fedavg, "--plots", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "algorithm", "backend"]
    assert "spafl" in table[1] and "fedavg" in table[2]
    assert os.path.isfile(tmp_path / "cmp" / "accuracy.png")


def test_resume_flag_continues_a_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", *_with(FLAGS, "--rounds", "1"), "--out", out, "--no-baseline"]) == 0
    assert main(["run", *FLAGS, "--out", out, "--no-baseline", "--resume"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["round"] for line in f] == [1, 2]


def test_setup_errors_are_reported_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dataset", "fmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err
