"""Resume survives damage: every damaged file stops the run with a message naming it,
a torn last metrics line is dropped, checkpoint.json cannot point outside the run folder, and a crash
while a checkpoint is written loses at most one round."""

import json
import os
import shutil

import pytest
import torch
from helpers_fl import tiny_config, tiny_flags
from safetensors.torch import load_file, save_file

import spafl_fl.checkpoint as checkpoint
from spafl_fl import Simulation
from spafl_fl.checkpoint import CheckpointError
from spafl_fl.cli import main

TENSORS = "checkpoint-000002.safetensors"


def _config(rounds=3):
    return tiny_config(rounds=rounds, measure_baseline=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder with 2 rounds done and checkpointed."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    Simulation(_config(2), out).run()
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished, out)
    return out


def _resume_error(out, match):
    with pytest.raises(CheckpointError, match=match):
        Simulation(_config(), out, resume=True)


def _rounds(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["round"] for line in f]


def _pointer(out, **changes):
    path = os.path.join(out, "checkpoint.json")
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del record[key]
    with open(path, "w") as f:
        json.dump(record, f)


def test_empty_or_truncated_tensor_file_is_named(run):
    path = os.path.join(run, TENSORS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _resume_error(run, f"{TENSORS} is damaged")
    open(path, "wb").close()
    _resume_error(run, f"{TENSORS} is damaged")


def test_damaged_checkpoint_json_is_named(run):
    _pointer(run, round=None)
    _resume_error(run, r"checkpoint.json is damaged: missing \['round'\]")
    with open(os.path.join(run, "checkpoint.json"), "w") as f:
        f.write('{"round": 2, "tens')
    _resume_error(run, "checkpoint.json is damaged")


def test_non_finite_tensors_are_refused_when_read(run):
    path = os.path.join(run, TENSORS)
    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path)
    _resume_error(run, f"{TENSORS} is damaged: non-finite values in .*{name}")


@pytest.mark.parametrize("name", ["../outside/checkpoint-000002.safetensors", "/tmp/checkpoint-000002.safetensors",
                                  "checkpoint-000001.safetensors", "sub/checkpoint-000002.safetensors"])
def test_tensors_entry_cannot_leave_the_run_folder(run, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(run, TENSORS), outside / TENSORS)
    _pointer(run, tensors=name)
    _resume_error(run, "'tensors' must be checkpoint-000002.safetensors in the run folder")


def test_torn_last_metrics_line_is_dropped(run):
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"round": 3, "accuracy": 5')  # a crash while round 3's line was written
    Simulation(_config(), run, resume=True).run()
    assert _rounds(run) == [1, 2, 3]


def test_damaged_or_duplicated_metrics_are_named(run):
    path = os.path.join(run, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").write(lines[0] + lines[1][:20])  # round 2's line torn: the checkpoint needs it
    _resume_error(run, "metrics.jsonl holds 1 rounds but the checkpoint holds 2")
    open(path, "w").write(lines[0] + lines[0] + lines[1])
    _resume_error(run, "metrics.jsonl line 2 is damaged: round 1 appears twice")
    open(path, "w").write(lines[0] + "{not json\n" + lines[1])
    _resume_error(run, "metrics.jsonl line 2 is damaged")


def test_checkpoint_that_does_not_fit_the_run_is_named(run):
    path = os.path.join(run, TENSORS)
    tensors = load_file(path)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, path)
    _resume_error(run, f"{TENSORS} does not fit this run: missing")


def test_cli_names_the_damaged_file_without_a_traceback(run, capsys):
    open(os.path.join(run, TENSORS), "wb").close()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *tiny_flags(3), "--out", run, "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and TENSORS in err and "Traceback" not in err


def test_resume_refuses_fewer_rounds_than_done(run, capsys):
    with pytest.raises(ValueError, match="--rounds 1 is fewer than the 2 rounds already done"):
        Simulation(_config(1), run, resume=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *tiny_flags(1), "--out", run, "--resume"])
    assert exit_info.value.code == 2 and "--rounds 1 is fewer than the 2 rounds" in capsys.readouterr().err


@pytest.mark.parametrize("fail_on", ["tensors", "pointer"])
def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(run, monkeypatch, fail_on):
    if fail_on == "tensors":
        def broken_save(tensors, path):
            open(path, "wb").write(b"half a file")
            raise OSError("disk full")

        monkeypatch.setattr(checkpoint, "save_file", broken_save)
    else:
        honest = checkpoint.atomic_write_text

        def broken_write(path, text):
            if path.endswith("checkpoint.json"):
                raise OSError("disk full")
            honest(path, text)

        monkeypatch.setattr(checkpoint, "atomic_write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        Simulation(_config(), run, resume=True).run()
    monkeypatch.undo()
    with open(os.path.join(run, "checkpoint.json")) as f:
        assert json.load(f)["tensors"] == TENSORS
    assert os.path.isfile(os.path.join(run, TENSORS)) and not any(n.startswith(".tmp-") for n in os.listdir(run))
    resumed = Simulation(_config(), run, resume=True)
    assert resumed.rounds_done == 2  # round 3's metrics line, written before its checkpoint, is dropped
    resumed.run()
    assert _rounds(run) == [1, 2, 3]
