"""One bad update, flag, file or link must not cost a user anything: FedAvg weights, outputs never written
through a symbolic link nor into a folder holding other files, values that pass a type check but crash
later, metrics files with wrong field types, and the deployment's resume (docs/DESIGN.md §8)."""

import json
import logging
import os
import shutil

import pytest
import torch
from helpers_fl import tiny_config, tiny_flags
from helpers_fl import usage_error as _usage_error

from spafl_fl import ClientUpdate, Server, Simulation
from spafl_fl.checkpoint import CheckpointError, atomic_write_text
from spafl_fl.cli import main
from spafl_fl.plots import plot_runs
from spafl_fl.rundir import OUTPUT_NAMES, read_metrics

FLAGS = tiny_flags(1)


def _update(cid, value, weight, failure=None):
    return ClientUpdate(cid, {"a": torch.full((3,), value)}, num_samples=weight, train_loss=0.0, train_seconds=0.0,
                        failure=failure)


# -- FedAvg's weights ------------------------------------------------------------------------------

def test_fedavg_rejects_weights_that_are_not_positive_finite_numbers(caplog):
    """Two updates of weight 0 gave a NaN model; weights 10 and -5 one outside the updates' hull."""
    server = Server({"a": torch.zeros(3)}, num_clients=6, sample=6, seed=0, weighting="samples")
    with caplog.at_level(logging.WARNING, logger="spafl_fl"):
        result = server.aggregate([_update(0, 1.0, 0), _update(1, 3.0, 0)], round_index=0)
    assert result.accepted == [] and [k for k, _ in result.rejected] == [0, 1]
    assert torch.equal(server.tensors["a"], torch.zeros(3)) and "weight" in result.rejected[0][1]
    result = server.aggregate([_update(0, 1.0, 10), _update(1, 3.0, -5), _update(2, 5.0, None),
                               _update(3, 7.0, float("nan")), _update(4, 9.0, True), _update(5, 2.0, 2.5)])
    assert result.accepted == [0, 5] and [k for k, _ in result.rejected] == [1, 2, 3, 4]
    assert torch.allclose(server.tensors["a"], torch.full((3,), (10 * 1.0 + 2.5 * 2.0) / 12.5))
    assert "rejected the update of client 1" in caplog.text


def test_a_non_finite_average_keeps_the_global_model_and_rejects_the_round():
    class Unchecked(Server):  # lets a non-finite update through, to reach the last guard
        def update_problems(self, update):
            return []

    server = Unchecked({"a": torch.ones(3)}, num_clients=2, sample=2, seed=0)
    result = server.aggregate([_update(0, 1.0, 5), _update(1, float("inf"), 5)], round_index=3)
    assert result.accepted == [] and [k for k, _ in result.rejected] == [0, 1]
    assert "not finite" in result.rejected[0][1] and torch.equal(server.tensors["a"], torch.ones(3))


@pytest.mark.parametrize("failure", ["", "   "])
def test_an_empty_failure_reason_is_still_a_failure(failure):
    server = Server({"a": torch.zeros(3)}, num_clients=2, sample=2, seed=0)
    result = server.aggregate([_update(0, 1.0, 5, failure=failure), _update(1, 3.0, 5)])
    assert result.accepted == [1] and "without a reason" in result.rejected[0][1]


# -- symbolic links and occupied folders -----------------------------------------------------------

@pytest.fixture
def elsewhere(tmp_path):
    """A folder outside every run folder, with one file per name that a link will point at."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def _link(folder, name, elsewhere) -> str:
    target = elsewhere / f"target-{name}"
    target.write_bytes(b"not yours")
    os.symlink(target, os.path.join(folder, name))
    return str(target)


def _untouched(elsewhere) -> bool:
    return all(p.read_bytes() == b"not yours" for p in elsewhere.iterdir())


def test_writers_never_follow_a_link(tmp_path, elsewhere):
    from spafl_fl.checkpoint import append_line
    from spafl_fl.rundir import close_log, log_handler

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("a.json", "accuracy.png", "density.png", "bits.png", "time.png"):
        _link(folder, name, elsewhere)
    atomic_write_text(str(folder / "a.json"), "{}")  # replaces the link itself
    assert not os.path.islink(folder / "a.json") and (folder / "a.json").read_text() == "{}"
    records = [{"round": 1, "accuracy": 1.0, "density": {"total": 1.0}, "uplink_bits": 1, "downlink_bits": 1,
                "dense_uplink_bits": 1, "train_seconds": 1.0, "baseline_train_seconds": None}]
    plot_runs([("x", records)], str(folder))
    assert not any(os.path.islink(folder / n) for n in ("accuracy.png", "density.png", "bits.png", "time.png"))
    _link(folder, "metrics.jsonl", elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        append_line(str(folder / "metrics.jsonl"), "{}")
    _link(folder, "run.log", elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        close_log(log_handler(str(folder / "run.log")))
    assert _untouched(elsewhere)


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """A finished one-round run, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("template") / "run"
    Simulation(tiny_config(rounds=1, measure_baseline=False), str(out)).run()
    return out


@pytest.mark.parametrize("name", [*OUTPUT_NAMES, "checkpoint-000001.safetensors"])
@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_run_refuses_an_output_that_is_a_link(tmp_path, capsys, elsewhere, one_round, name, mode):
    """`run --overwrite` overwrote r/accuracy.png -> elsewhere and appended to r/metrics.jsonl -> elsewhere."""
    out = tmp_path / "run"
    shutil.copytree(one_round, out)
    if os.path.lexists(out / name):
        os.remove(out / name)
    _link(out, name, elsewhere)
    err = _usage_error(capsys, ["run", *tiny_flags(2), "--out", str(out), mode])
    assert "symbolic link" in err and name in err
    assert _untouched(elsewhere)


def test_compare_plots_refuse_a_link(tmp_path, capsys, elsewhere):
    run = str(tmp_path / "run")
    assert main(["run", *FLAGS, "--out", run]) == 0
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in ("accuracy.png", "density.png", "bits.png", "time.png"):
        _link(plots, name, elsewhere)
        assert "symbolic link" in _usage_error(capsys, ["compare", run, "--plots", str(plots), "--overwrite"])
        os.remove(plots / name)
    assert _untouched(elsewhere)


def test_reproduce_refuses_occupied_folders_links_and_no_rounds(tmp_path, capsys, elsewhere):
    """reproduce replaced a user's report.md, results.json and plots; --rounds 0 ran everything, then a TypeError."""
    out = tmp_path / "repro"
    out.mkdir()
    (out / "report.md").write_text("my report")
    argv = ["reproduce", "--out", str(out), "--datasets", "digits", "--rounds", "1", "--clients", "4", "--sample",
            "2", "--local-epochs", "1", "--bits-rounds", "0", "--no-progress"]
    assert "is not empty" in _usage_error(capsys, argv)
    for name in ("report.md", "results.json", "plots", "runs"):
        if os.path.lexists(out / name):
            os.remove(out / name)
        _link(out, name, elsewhere)
        assert "symbolic link" in _usage_error(capsys, [*argv, "--overwrite"])
        os.remove(out / name)
    assert _untouched(elsewhere) and os.listdir(out) == []
    fresh = tmp_path / "fresh"
    assert "--rounds must be an integer >= 1" in _usage_error(capsys, [*argv[:2], str(fresh), *argv[3:5], "--rounds",
                                                                         "0", *argv[7:]])
    assert not fresh.exists()


def test_flower_app_keeps_a_users_files_and_names_a_file_given_as_folder(tmp_path, capsys, elsewhere):
    """flower-app replaced a user's README.md, ignored --overwrite, and printed a raw [Errno 17] for --out FILE."""
    pytest.importorskip("flwr")
    out = tmp_path / "app"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    argv = ["flower-app", "--clients", "3", "--sample", "2", "--out", str(out)]
    assert "is not empty" in _usage_error(capsys, argv)
    assert (out / "README.md").read_text() == "my notes" and not (out / "pyproject.toml").exists()
    (out / "notes.txt").write_text("keep me")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "README.md").read_text() != "my notes" and (out / "notes.txt").read_text() == "keep me"
    os.remove(out / "README.md")
    _link(out, "README.md", elsewhere)
    assert "symbolic link" in _usage_error(capsys, [*argv, "--overwrite"])
    assert _untouched(elsewhere)
    (tmp_path / "file").write_text("x")
    err = _usage_error(capsys, [*argv[:-1], str(tmp_path / "file")])
    assert "is a file, not a folder" in err and "Errno" not in err


def test_deploy_local_and_the_server_app_keep_a_users_files(tmp_path, capsys, elsewhere):
    """deploy-local replaced a user's config.json in a non-empty --out; so did the ServerApp in its out-dir."""
    pytest.importorskip("flwr")
    from spafl_fl.flower_app.strategy import RunStrategy as make_strategy

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    argv = ["deploy-local", *FLAGS, "--supernodes", "4", "--out", str(out)]
    assert "is not empty" in _usage_error(capsys, argv)
    assert not (out / "deployment").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        make_strategy(tiny_config(rounds=1), str(out))
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == '{"mine": 1}'
    for name in ("status.json", "deployment.json", "metrics.jsonl"):
        _link(out, name, elsewhere)
        assert "symbolic link" in _usage_error(capsys, [*argv, "--overwrite"])
        with pytest.raises(FileExistsError, match="symbolic link"):
            make_strategy(tiny_config(rounds=1), str(out), overwrite=True)
        os.remove(out / name)
    assert _untouched(elsewhere) and os.listdir(out) == ["config.json"]


def test_the_simulation_strategy_keeps_a_users_files(tmp_path):
    """SpaFLStrategy(config, out_dir) replaced a user's config.json unless a metrics.jsonl was there."""
    pytest.importorskip("flwr")
    from spafl_fl.flower_app.strategy import RunStrategy as SpaFLStrategy

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match="not empty"):
        SpaFLStrategy(tiny_config(rounds=1), str(out))
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == '{"mine": 1}'


def test_flower_refuses_a_link_before_starting_ray(tmp_path, capsys, elsewhere):
    pytest.importorskip("flwr")
    out = tmp_path / "out"
    out.mkdir()
    _link(out, "summary.json", elsewhere)
    assert "symbolic link" in _usage_error(capsys, ["flower", *FLAGS, "--out", str(out), "--overwrite"])
    assert _untouched(elsewhere)


# -- values that pass a type check but crash later ------------------------------------------------

@pytest.mark.parametrize("command", ["run", "deploy-local"])
@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "1e300", "every round's learning rate"),
    ("--lr-decay", "1e308", "every round's learning rate"),
    ("--batch-size", "9223372036854775808", "--batch-size must be an integer in [1, 2147483647]"),
    ("--threads", "100000", "--threads must be an integer in [0, 1024]"),
    ("--threads", "1000", "--threads must be at most this machine's"),
    ("--rounds", "0", "--rounds must be an integer in [1, "),
    ("--device", "cpu:1", "there is one cpu device"),
    ("--out", "", "--out is empty"),
])
def test_values_that_crashed_later_are_usage_errors(tmp_path, capsys, command, flag, value, says):
    if command == "deploy-local":
        pytest.importorskip("flwr")
    if flag == "--threads" and value == "1000" and (os.cpu_count() or 1) >= 1000:
        pytest.skip("a machine with 1000 CPUs")
    argv = [*tiny_flags(3), "--out", str(tmp_path / "out")]
    argv = [*argv[:argv.index(flag) + 1], value, *argv[argv.index(flag) + 2:]] if flag in argv else [
        *argv, flag, value]
    if command == "deploy-local":
        argv = [a for a in argv if a not in ("--clients", "4")] + ["--supernodes", "4"]
    assert says in _usage_error(capsys, [command, *argv])
    assert not (tmp_path / "out").exists()


def test_too_many_clients_fail_at_once(tmp_path, capsys):
    """--clients 100000 on digits redrew the split for ~30 minutes before saying so."""
    import time

    start = time.perf_counter()
    err = _usage_error(capsys, ["run", *FLAGS, "--dataset", "digits", "--clients", "100000", "--sample", "2",
                                "--out", str(tmp_path / "out")])
    assert "--clients 100000 is too many for" in err and time.perf_counter() - start < 60


def test_flower_app_writes_every_algorithm(tmp_path, capsys):
    """The deployment runs every registered algorithm: flower-app writes an app for Local too."""
    pytest.importorskip("flwr")
    assert main(["flower-app", "--clients", "3", "--sample", "2", "--algorithm", "local", "--out",
                 str(tmp_path / "app")]) == 0
    assert 'algorithm = "local"' in (tmp_path / "app" / "pyproject.toml").read_text()


# -- metrics files with wrong field types ----------------------------------------------------------

@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *tiny_flags(2), "--out", str(out)]) == 0
    return out


def _rewrite_first(out, **fields):
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **fields})
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("fields, says", [
    ({"density": "0.5"}, "density must map"),
    ({"density": {"total": "0.5"}}, "density must map"),
    ({"accuracy": None}, "accuracy must be a finite number"),
    ({"train_flops": [1]}, "train_flops must be a finite number"),
    ({"mean_row_density": "x"}, "mean_row_density must be a finite number or null"),
    ({"round": True}, "round True"),
])
def test_metrics_with_wrong_types_are_named_by_file_and_line(finished, capsys, fields, says):
    path = _rewrite_first(finished, **fields)
    with pytest.raises(CheckpointError, match=f"{path} line 1 is damaged") as error:
        read_metrics(path)
    assert says in str(error.value)
    err = _usage_error(capsys, ["compare", str(finished), "--plots", str(finished.parent / "plots")])
    assert f"{path} line 1" in err


@pytest.mark.parametrize("density", ["0.5", None, {"total": "x"}, {"fc": True}])
def test_bench_density_from_names_a_damaged_last_round(finished, capsys, density):
    from spafl_kernels.bench import cli as bench

    path = finished / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[-1] = json.dumps({**json.loads(lines[-1]), "density": density})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--models", "mlp", "--density-from", str(finished), "--reps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{path} line 2 is damaged" in err and "Traceback" not in err


def test_bench_quick_keeps_the_flags_given(monkeypatch, capsys):
    """--quick replaced an explicit --reps, --layers and --densities with its own."""
    from spafl_kernels.bench import cli as bench

    seen = {}

    def fake_run(layers, densities, candidates, stes, modes, reps, *rest, **kwargs):
        seen.update(layers=layers, densities=densities, stes=stes, modes=modes, reps=reps)
        return []

    monkeypatch.setattr(bench, "run", fake_run)
    bench.main(["--quick", "--reps", "2", "--layers", "lenet5-fc1", "--densities", "0.5", "--backends", "masked"])
    assert seen == {"layers": ["lenet5-fc1"], "densities": [0.5], "stes": bench.QUICK["stes"],
                    "modes": bench.QUICK["modes"], "reps": 2}
    bench.main(["--quick", "--backends", "masked"])
    assert seen["reps"] == bench.QUICK["reps"] and seen["densities"] == bench.QUICK["densities"]


# -- the deployment resumes through the in-process loop's checks -----------------------------------

def test_deployed_resume_checks_every_file_like_the_loop(tmp_path, monkeypatch):
    """A torn last line gave a JSONDecodeError naming no file, a missing key a KeyError, and wrong-shaped or
    extra tensors were accepted and failed mid-round on the clients."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file, save_file
    from test_fl_deploy import deployed_grid

    from spafl_fl.flower_app.strategy import RunStrategy as make_strategy
    from spafl_fl.flower_app.strategy import drive

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    out = tmp_path / "run"
    first = tiny_config(rounds=1, measure_baseline=False)
    drive(make_strategy(first, str(out)), deployed_grid(first, tmp_path / "nodes"), timeout=30)
    config = tiny_config(rounds=2, measure_baseline=False)
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"round": 2, "accur')  # torn: dropped, as the in-process loop does
    assert make_strategy(config, str(out), resume=True).rounds_done == 1
    assert metrics.read_text() == good
    record = json.loads(good)
    del record["accuracy"]
    metrics.write_text(json.dumps(record) + "\n")
    with pytest.raises(CheckpointError, match=f"{metrics} line 1 is damaged: missing"):
        make_strategy(config, str(out), resume=True)
    metrics.write_text(good)
    path = out / "checkpoint-000001.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    for bad, says in (({**tensors, name: torch.zeros(tensors[name].numel() + 1)}, "shape"),
                      ({**tensors, "server.extra": torch.zeros(1)}, "unknown names")):
        save_file(bad, str(path))
        with pytest.raises(CheckpointError, match=f"{path} does not fit this run: .*{says}"):
            make_strategy(config, str(out), resume=True)
