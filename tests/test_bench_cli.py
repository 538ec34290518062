"""spafl-bench checks its arguments before timing anything: a bad output path used to
lose a finished run."""

import json

import pytest
import torch

from spafl_kernels.bench import cli

QUICK = ["--layers", "lenet5-fc2", "--densities", "1", "--reps", "1", "--modes", "fwd", "--ste", "outer",
         "--backends", "masked"]


@pytest.fixture
def no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timing started before the arguments were checked")

    monkeypatch.setattr(cli, "run", refuse)


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, says", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--threads", "-3"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--ste", "tanh"], "--ste: unknown ['tanh']"),
    (["--backends", "fast"], "--backends: unknown 'fast'"),
    (["--backends", "dense"], "--backends: dense is always timed"),
    (["--densities", "1.5"], "--densities must lie in (0, 1]"),
    (["--clock", "thread", "--threads", "2"], "--clock thread times the calling thread only"),
    (["--clock", "cpu"], "invalid choice: 'cpu'"),
])
def test_bad_arguments_stop_before_timing(capsys, no_timing, flags, says):
    assert says in _usage_error(capsys, [*QUICK, *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors on a machine without CUDA")
def test_a_backend_or_device_that_cannot_run_here_is_named(capsys, no_timing):
    assert "--backends: cuda cannot run here" in _usage_error(capsys, [*QUICK, "--backends", "cuda"])
    assert "--device cuda: CUDA is not available" in _usage_error(capsys, [*QUICK, "--device", "cuda"])


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_output_paths_are_checked_before_timing(tmp_path, capsys, no_timing, flag):
    name = "out.png" if flag == "--plot" else "out.txt"
    missing = str(tmp_path / "no" / "such" / name)
    assert f"{flag} {missing}: folder" in _usage_error(capsys, [*QUICK, flag, missing])
    assert f"{flag} {tmp_path} is a folder" in _usage_error(capsys, [*QUICK, flag, str(tmp_path)])


def test_plot_extension_and_one_file_for_two_outputs_are_refused(tmp_path, capsys, no_timing):
    assert "--plot" in _usage_error(capsys, [*QUICK, "--plot", str(tmp_path / "speedup.xyz")])
    same = str(tmp_path / "report")
    assert "--json and --markdown name the same file" in _usage_error(
        capsys, [*QUICK, "--json", same, "--markdown", same])


def test_valid_outputs_are_written(tmp_path, capsys):
    cli.main([*QUICK, "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    with open(tmp_path / "r.json") as f:
        assert [row["backend"] for row in json.load(f)["rows"]] == ["masked"]
    assert (tmp_path / "r.md").read_text().startswith("# Sparse layers against dense")


def test_thread_clock_is_recorded(tmp_path, capsys):
    """``--clock thread`` (a loaded machine): the record and the report say the times are CPU time."""
    cli.main([*QUICK, "--threads", "1", "--clock", "thread", "--json", str(tmp_path / "r.json"), "--markdown",
              str(tmp_path / "r.md")])
    with open(tmp_path / "r.json") as f:
        record = json.load(f)
    assert record["meta"]["clock"] == "thread" and record["rows"][0]["seconds"] > 0
    assert "timed in the calling thread's CPU time" in (tmp_path / "r.md").read_text()
