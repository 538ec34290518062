"""The spafl-fl command end to end in a temporary folder."""

import json
import os
import re

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


def test_preset_values_are_resolved_and_flags_given_win(tmp_path, capsys):
    out = str(tmp_path / "preset")
    flags = ["--preset", "fmnist-lenet5", "--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample",
             "2", "--rounds", "1", "--local-epochs", "1", "--no-baseline", "--no-progress", "--threads", "1"]
    assert main(["run", *flags, "--out", out]) == 0
    report = capsys.readouterr().out
    assert "mean row density" in report and "authors' FLOPs" in report
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    # from the preset: lr, batch, alpha, th_coeff, STE, clip; given: dataset, model, clients, sample, rounds, epochs
    assert (config["lr"], config["batch_size"], config["alpha"], config["th_coeff"], config["ste"], config["clip"]) == (
        1e-3, 64, 0.2, 2e-3, "identity", 0.0)
    assert (config["dataset"], config["model"], config["clients"], config["sample"], config["rounds"],
            config["local_epochs"]) == ("synthetic", "mlp", 4, 2, 1, 1)
    assert config["preset"] == "fmnist-lenet5" and config["global_update"] == "lazy"


def test_local_run_in_compare(tmp_path, capsys):
    local = str(tmp_path / "local")
    assert main(["run", *FLAGS, "--algorithm", "local", "--out", local]) == 0
    assert "nothing" not in capsys.readouterr().err
    assert main(["compare", local]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "row density" in table[0] and "authors FLOPs/client" in table[0]
    assert table[1].split()[1] == "local"


def test_reproduce_writes_one_page(tmp_path, capsys):
    out = tmp_path / "repro"
    argv = ["reproduce", "--out", str(out), "--datasets", "digits", "--rounds", "1", "--clients", "4", "--sample",
            "2", "--local-epochs", "1", "--bits-rounds", "1", "--no-progress"]
    assert main(argv) == 0
    page = (out / "report.md").read_text()
    for phrase in ("## Targets", "FedAvg / SpaFL bits, LeNet-5, 100 clients, 10 per round, lazy: ",
                   "SpaFL (lazy update)", "SpaFL (eager update)", "masked dense", "FedAvg (dense)", "Local",
                   "mean row density", "authors' FLOPs / client", "](plots/digits/accuracy.png)"):
        assert phrase in page, phrase
    assert (out / "plots" / "digits" / "bits.png").is_file()
    # A second call (--resume: the folder is not empty) reads the finished runs back instead of running them again.
    before = (out / "runs" / "digits" / "spafl" / "metrics.jsonl").read_text()
    assert main([*argv, "--resume"]) == 0
    assert (out / "runs" / "digits" / "spafl" / "metrics.jsonl").read_text() == before


# -- each subcommand's help lists exactly what it accepts -----------------------------------------------------

COMMANDS = ("run", "flower", "deploy-local", "flower-app", "compare", "reproduce", "export")
ONLY = {"run": {"--split", "--batch-order"},
        "deploy-local": {"--supernodes", "--timeout"}, "flower-app": {"--out-dir"}, "compare": {"--plots"},
        "reproduce": {"--datasets", "--bits-rounds"}, "export": {"--client"}}
"""Flags one subcommand has and no other may list."""
SAMPLES = {"--dataset": ["digits"], "--model": ["lenet5"], "--skip": ["head", "--model", "mymodels:build"],
           "--clients": ["4"], "--sample": ["2"],
           "--rounds": ["3"], "--local-epochs": ["2"], "--batch-size": ["16"], "--lr": ["0.01"], "--lr-decay": ["0.99"],
           "--momentum": ["0.5"], "--weight-decay": ["0.001"], "--clip": ["5"], "--th-coeff": ["0.01"],
           "--th-warmup": ["2"], "--alpha": ["0.3"], "--test-fraction": ["0.3"], "--min-density": ["0.1"],
           "--seed": ["7"], "--device": ["cpu"], "--threads": ["1"], "--input-scale": ["255"], "--supernodes": ["4"],
           "--round-timeout": ["30"], "--connect-timeout": ["30"], "--timeout": ["100"], "--out-dir": ["/srv/run"],
           "--bits-rounds": ["1"], "--client": ["1"]}
"""A value each flag accepts (besides the choices its help lists)."""


class Reached(Exception):
    """The command got past its flag checks to the work itself."""


def _listed(capsys, command: str) -> tuple[str, dict[str, list[str] | None]]:
    """``command --help``'s text and its options: flag -> the choices its help shows (None: none shown)."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    found = re.findall(r"^  (?:-h, )?(--[\w-]+)(?: \{([^}]*)\})?", options, re.M)
    return text, {flag: choices.split(",") if choices else None for flag, choices in found if flag != "--help"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_only_the_flags_the_subcommand_accepts(command, capsys, tmp_path, monkeypatch):
    def reached(*args, **kwargs):
        raise Reached(args)

    for name in ("_flower", "_deploy_local", "_flower_app", "_compare", "_export"):
        monkeypatch.setattr(f"spafl_fl.cli.{name}", reached)
    monkeypatch.setattr("spafl_fl.reproduce.reproduce", reached)
    monkeypatch.setattr("spafl_fl.simulation.Simulation", reached)
    out = str(tmp_path / "out")
    base = {"compare": [str(tmp_path)], "export": [str(tmp_path), "--client", "0", "--out", out + ".safetensors"]}
    text, listed = _listed(capsys, command)
    assert listed
    for flag, choices in listed.items():
        if flag == "--out":
            continue  # in every base command line
        if flag == "--data-dir":
            values = [["--datasets" if command == "reproduce" else "--dataset", "fmnist", flag, str(tmp_path)]]
        elif flag == "--plots":
            values = [[flag, str(tmp_path / "plots")]]
        elif choices:
            values = [[flag, choice] for choice in choices]
        elif flag in SAMPLES:
            values = [[flag, *SAMPLES[flag]]]
        else:
            values = [[flag]]  # a switch
        for given in values:
            argv = [command, *base.get(command, ["--out", out]), *given]
            with pytest.raises(Reached):
                main(argv)
            assert "error" not in capsys.readouterr().err, argv
    for other, flags in ONLY.items():
        if other != command:
            assert not flags & set(listed), f"{command} --help lists {sorted(flags & set(listed))} of {other}"
    if command in ("flower", "deploy-local", "flower-app"):
        assert "--no-progress" not in listed and "lazy-last" not in text  # only `run` has them
