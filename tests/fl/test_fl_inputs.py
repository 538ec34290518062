"""Inputs are checked before work starts: bad flags, conflicting defaults, damaged data
files and run folders give a usage error naming the flag or file (exit 2, no traceback); --help shows
every default; Ctrl-C prints one line with the exact command that resumes the run."""

import gzip
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
import torch
from helpers_fl import tiny_flags
from helpers_fl import usage_error as _usage_error

from spafl_fl import Simulation
from spafl_fl.cli import main
from spafl_fl.data import CIFAR10_FILES, FMNIST_FILES, load_cifar10, load_fmnist

FLAGS = tiny_flags(2)


@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "inf", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0"),
    ("--threads", "-3", "--threads must be an integer in [0, 1024]"),
    ("--min-density", "5", "--min-density must be a number in [0, 1]"),
    ("--seed", "-1", "--seed must be an integer"),
    ("--momentum", "-0.5", "--momentum must be a finite number >= 0"),
    ("--sample", "5", "--sample (5) must be at most --clients (4)"),
    ("--device", "tpu", "--device must be cpu or cuda"),
    ("--data-dir", ".", "--data-dir is read for --dataset fmnist and cifar10 only"),
])
def test_bad_flags_are_usage_errors_before_any_work(tmp_path, capsys, flag, value, says):
    argv = [*FLAGS, flag, value] if flag not in FLAGS else [
        *FLAGS[:FLAGS.index(flag) + 1], value, *FLAGS[FLAGS.index(flag) + 2:]]
    out = tmp_path / "out"
    assert says in _usage_error(capsys, ["run", *argv, "--out", str(out)])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(capsys, ["run", *FLAGS, "--device", "cuda", "--out", str(tmp_path / "x")])
    assert "--device 'cuda': CUDA is not available" in err


def test_a_default_is_clamped_to_a_given_flag_never_the_reverse(tmp_path, capsys):
    """--clients 4 alone failed because the default --sample is 5."""
    out = tmp_path / "run"
    flags = [f for i, f in enumerate(FLAGS) if f != "--sample" and FLAGS[i - 1] != "--sample"]
    assert main(["run", *flags, "--rounds", "1", "--out", str(out)]) == 0
    with open(out / "config.json") as f:
        assert json.load(f)["sample"] == 4


@pytest.mark.parametrize("command", ["run", "flower", "compare"])
def test_help_shows_every_default(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    # one entry per option: its first line starts with two spaces and a dash
    entries = re.split(r"\n(?=  -)", options.split("\n", 1)[1])
    entries = [e for e in entries if not e.lstrip().startswith(("-h", "--help", "--out"))]
    assert entries
    for entry in entries:
        assert "(default:" in " ".join(entry.split()), entry


def _write_idx(path, array, gz=True):
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def _fmnist(folder, counts=(6, 6, 4, 4), bad_label=None, side=28):
    rng = np.random.default_rng(0)
    for name, n in zip(FMNIST_FILES, counts):
        shape = (n, side, side) if "images" in name else (n,)
        values = rng.integers(0, 10 if "labels" in name else 256, shape)
        if bad_label is not None and name == "train-labels-idx1-ubyte":
            values[0] = bad_label
        _write_idx(os.path.join(folder, name), values)


@pytest.mark.parametrize("damage, names, says", [
    (dict(counts=(6, 5, 4, 4)), "train-labels-idx1-ubyte.gz", "holds 5 labels but .*train-images-idx3-ubyte.gz"),
    (dict(bad_label=12), "train-labels-idx1-ubyte.gz", "labels must lie in 0..9, found 12"),
    (dict(side=27), "train-images-idx3-ubyte.gz", r"images of shape \[6, 27, 27\], expected \[n, 28, 28\]"),
])
def test_damaged_fmnist_files_are_named(tmp_path, damage, names, says):
    _fmnist(str(tmp_path), **damage)
    with pytest.raises(ValueError, match=f"{names}.*{says}"):
        load_fmnist(str(tmp_path))


def test_truncated_gz_is_named_and_a_usage_error(tmp_path, capsys):
    _fmnist(str(tmp_path))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: truncated or damaged gzip"):
        load_fmnist(str(tmp_path))
    err = _usage_error(capsys, ["run", "--dataset", "fmnist", "--data-dir", str(tmp_path), "--model", "mlp",
                                "--clients", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "t10k-images-idx3-ubyte.gz" in err


def test_cifar_labels_outside_the_classes_are_named(tmp_path):
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        records = rng.integers(0, 256, (3, 3073)).astype(np.uint8)
        records[:, 0] = [1, 2, 11 if name == "data_batch_3.bin" else 3]
        (tmp_path / name).write_bytes(records.tobytes())
    with pytest.raises(ValueError, match="data_batch_3.bin: labels must lie in 0..9, found 11"):
        load_cifar10(str(tmp_path))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert main(["run", *FLAGS, "--out", out]) == 0
    return out


def test_compare_refuses_missing_unfinished_or_corrupt_folders(finished, tmp_path, capsys):
    capsys.readouterr()
    assert "no such folder" in _usage_error(capsys, ["compare", finished, str(tmp_path / "nowhere")])
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(finished, unfinished)
    os.remove(os.path.join(unfinished, "summary.json"))
    assert "not a finished run: missing summary.json" in _usage_error(capsys, ["compare", unfinished])
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(finished, corrupt)
    with open(os.path.join(corrupt, "summary.json"), "w") as f:
        f.write('{"algorithm": "spafl", "rou')
    assert os.path.join(corrupt, "summary.json") + " is damaged" in _usage_error(capsys, ["compare", corrupt])
    with open(os.path.join(corrupt, "summary.json"), "w") as f:
        json.dump({"algorithm": "spafl"}, f)
    assert "summary.json is damaged: missing" in _usage_error(capsys, ["compare", corrupt])


def test_ctrl_c_prints_one_line_with_the_exact_resume_command(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    honest = Simulation.run_round

    def interrupted(self, r):
        if r == 1:
            raise KeyboardInterrupt
        return honest(self, r)

    monkeypatch.setattr(Simulation, "run_round", interrupted)
    assert main(["run", *FLAGS, "--out", out]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert "Traceback" not in "\n".join(err) and line.startswith("spafl-fl: interrupted; 1 of 2 rounds are saved")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[-1] == "--resume" and command[command.index("--out") + 1] == out
    monkeypatch.undo()
    assert main(command[command.index("run"):]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["round"] for line in f] == [1, 2]


def test_ctrl_c_before_the_first_checkpoint_says_how_to_start_again(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")

    def interrupted(self, r):
        raise KeyboardInterrupt

    monkeypatch.setattr(Simulation, "run_round", interrupted)
    assert main(["run", *FLAGS, "--out", out]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no round was saved" in line and line.endswith("--overwrite")
