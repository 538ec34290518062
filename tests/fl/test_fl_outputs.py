"""The run folder: a run never deletes or overwrites a file it did not write, and
every file it writes has one mode (item 10)."""

import json
import os
import stat

import pytest
from helpers_fl import tiny_config, tiny_flags

from spafl_fl import Simulation
from spafl_fl.cli import main

USER_FILES = {"checkpoint-best.safetensors": b"my best model", "config.json": b'{"mine": 1}',
              "accuracy.png": b"my plot", "notes.txt": b"keep me"}


def _user_folder(path):
    path.mkdir()
    for name, content in USER_FILES.items():
        (path / name).write_bytes(content)
    return str(path)


def _unchanged(folder):
    return all(open(os.path.join(folder, name), "rb").read() == content for name, content in USER_FILES.items())


def _rounds(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["round"] for line in f]


def test_fresh_run_refuses_a_non_empty_folder_and_touches_nothing(tmp_path, capsys):
    out = _user_folder(tmp_path / "mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *tiny_flags(1), "--out", out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "--resume" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == sorted(USER_FILES) and _unchanged(out)
    with pytest.raises(FileExistsError, match="not empty"):
        Simulation(tiny_config(rounds=1), out)
    assert sorted(os.listdir(out)) == sorted(USER_FILES)


def test_overwrite_replaces_only_the_files_a_run_writes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", *tiny_flags(2), "--out", out]) == 0
    (tmp_path / "run" / "checkpoint-best.safetensors").write_bytes(b"my best model")
    (tmp_path / "run" / "notes.txt").write_bytes(b"keep me")
    assert main(["run", *tiny_flags(1), "--out", out, "--overwrite"]) == 0
    assert _rounds(out) == [1]
    assert (tmp_path / "run" / "checkpoint-best.safetensors").read_bytes() == b"my best model"
    assert (tmp_path / "run" / "notes.txt").read_bytes() == b"keep me"
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == [
        "checkpoint-000001.safetensors", "checkpoint-best.safetensors", "checkpoint.json"]
    with pytest.raises(SystemExit):
        main(["run", *tiny_flags(2), "--out", out, "--overwrite", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_checkpoints_never_remove_a_users_file(tmp_path):
    """The defect: saving a checkpoint removed every other checkpoint-*.safetensors in the folder."""
    out = str(tmp_path / "run")
    Simulation(tiny_config(rounds=1, measure_baseline=False), out).run()
    (tmp_path / "run" / "checkpoint-best.safetensors").write_bytes(b"my best model")
    Simulation(tiny_config(rounds=3, measure_baseline=False), out, resume=True).run()
    assert (tmp_path / "run" / "checkpoint-best.safetensors").read_bytes() == b"my best model"
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint-0")) == ["checkpoint-000003.safetensors"]


def test_compare_refuses_to_write_plots_over_files(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["run", *tiny_flags(1), "--out", run]) == 0
    plots = _user_folder(tmp_path / "plots")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", run, "--plots", plots])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert _unchanged(plots)
    assert main(["compare", run, "--plots", plots, "--overwrite"]) == 0
    assert (tmp_path / "plots" / "notes.txt").read_bytes() == b"keep me"
    assert (tmp_path / "plots" / "accuracy.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_has_the_same_mode(tmp_path, umask):
    """config.json, summary.json and checkpoint.json were 0600 while the other outputs were 0644."""
    previous = os.umask(umask)
    try:
        out = str(tmp_path / "run")
        assert main(["run", *tiny_flags(1), "--out", out]) == 0
        assert main(["run", *tiny_flags(2), "--out", out, "--resume"]) == 0  # rewrites metrics.jsonl
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) for name in os.listdir(out)}
    assert {"config.json", "summary.json", "checkpoint.json", "metrics.jsonl", "run.log", "accuracy.png",
            "checkpoint-000002.safetensors"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
