"""``spafl-fl export``: a client's model from a run's checkpoint, reloaded without this package, gets the sparse
model's test accuracy exactly; outputs are never overwritten without --overwrite nor written through a symlink."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from helpers_fl import tiny_config
from safetensors.torch import load_file

from spafl_fl.cli import main
from spafl_fl.client import evaluate
from spafl_fl.exporting import load_client_model
from spafl_fl.simulation import Simulation
from spafl_kernels import density

# A penalty high enough that two short rounds prune some rows (density under 1).
RUNS = {"mlp": dict(th_coeff=0.05), "lenet5": dict(dataset="digits", model="lenet5", rounds=1, th_coeff=0.2)}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run_dir(request, tmp_path_factory):
    """A finished tiny run and its client with the fewest active weights (some rows pruned)."""
    folder = str(tmp_path_factory.mktemp("run") / request.param)
    simulation = Simulation(tiny_config(measure_baseline=False, **RUNS[request.param]), folder)
    simulation.run()
    densities = [density(client.model)["total"] for client in simulation.clients]
    assert min(densities) < 1.0
    return folder, densities.index(min(densities))


def _load_architecture(path: str):
    spec = importlib.util.spec_from_file_location("exported_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_reloads_with_the_sparse_models_accuracy(run_dir, tmp_path, capsys):
    run_dir, client = run_dir
    out = str(tmp_path / "client1.safetensors")
    assert main(["export", run_dir, "--client", str(client), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "wrote" in printed
    model, data, _ = load_client_model(run_dir, client)
    sparse_acc, sparse_loss = evaluate(model, data)

    arch = _load_architecture(str(tmp_path / "client1.py"))
    plain = arch.ExportedModel()
    plain.load_state_dict(load_file(out))
    assert not any("spafl" in type(m).__module__ for m in plain.modules())
    acc, loss = evaluate(plain, data)
    assert acc == sparse_acc and loss == pytest.approx(sparse_loss, rel=1e-5)

    program = torch.export.load(str(tmp_path / "client1.pt2")).module()
    with torch.no_grad():
        logits = program(data.x_test)
    assert 100.0 * int((logits.argmax(1) == data.y_test).sum()) / len(data.y_test) == sparse_acc

    record = json.loads((tmp_path / "client1.report.json").read_text())
    assert record["sparse_test_accuracy"] == record["exported_test_accuracy"] == sparse_acc
    assert record["params_after"] < record["params_before"]  # the run pruned rows; they are gone
    assert record["params_after"] == sum(p.numel() for p in plain.parameters())
    assert "| **total**" in (tmp_path / "client1.report.md").read_text()


def test_export_never_overwrites_without_consent(run_dir, tmp_path, capsys):
    run_dir = run_dir[0]
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"user data")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run_dir, "--client", "0", "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"user data" and not (tmp_path / "m.py").exists()
    assert main(["export", run_dir, "--client", "0", "--out", str(out), "--overwrite"]) == 0
    assert load_file(str(out))


def test_export_refuses_symlinks_and_bad_arguments(run_dir, tmp_path, capsys):
    run_dir = run_dir[0]
    target = tmp_path / "elsewhere.py"
    target.write_text("# the user's file\n")
    os.symlink(target, tmp_path / "m.py")
    cases = [
        (["--client", "0", "--out", str(tmp_path / "m.safetensors"), "--overwrite"], "symbolic link"),
        (["--client", "99", "--out", str(tmp_path / "a.safetensors")], "--client must be in"),
        (["--client", "0", "--out", str(tmp_path / "a.bin")], ".safetensors"),
        (["--client", "0", "--out", str(tmp_path / "missing" / "a.safetensors")], "does not exist"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", run_dir, *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--client", "0", "--out", str(tmp_path / "a.safetensors")])
    assert "not a run folder" in capsys.readouterr().err
    assert target.read_text() == "# the user's file\n"
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.py", "m.py"]
