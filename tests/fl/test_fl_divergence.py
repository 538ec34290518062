"""A diverging client: its update is rejected and logged, its model goes back to where
the round started, and the round and the run complete, for SpaFL as for FedAvg."""

import copy
import dataclasses
import json
import logging
import math
import os

import pytest
import torch
from helpers_fl import tiny_config

from spafl_fl import Simulation
from spafl_fl.cli import main


@pytest.mark.parametrize("global_update", ["eager", "lazy"])
def test_one_diverging_spafl_client_is_rejected_and_the_round_completes(global_update, caplog):
    sim = Simulation(tiny_config(clients=4, sample=3, measure_baseline=True, global_update=global_update))
    victim = sim.server.sample_clients(0)[1]
    before = copy.deepcopy(sim.clients[victim].model.state_dict())
    honest_fit = sim.clients[victim].fit

    def diverging_fit(hp, *args, **kwargs):
        return honest_fit(dataclasses.replace(hp, lr=1e6), *args, **kwargs)

    sim.clients[victim].fit = diverging_fit
    with caplog.at_level(logging.WARNING, logger="spafl_fl"):
        record = sim.run_round(0)
    assert [r["client"] for r in record["rejected"]] == [victim]
    assert "training diverged" in record["rejected"][0]["reason"]
    assert any(f"rejected the update of client {victim}: training diverged" in r.getMessage() for r in caplog.records)
    assert all(bool(torch.isfinite(t).all()) for t in sim.server.tensors.values())
    # The victim's round is undone: its old weights, plus (eager) the global update after aggregation;
    # lazy clients get that update when next sampled.
    model = sim.clients[victim].model
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    assert torch.equal(model.hidden[1].weight, before["hidden.1.weight"]) == (global_update == "lazy")
    assert torch.equal(model.out.weight, before["out.weight"])  # the dense classifier gets no global update
    assert math.isfinite(record["accuracy"]) and math.isfinite(record["train_loss"])
    assert record["baseline_train_seconds"] is not None


@pytest.mark.parametrize("algorithm", ["spafl", "fedavg"])
def test_cli_run_with_a_huge_lr_finishes(tmp_path, capsys, algorithm):
    """--lr 1e6 on a small SpaFL run ended in a traceback ('threshold has non-finite values')."""
    out = str(tmp_path / "run")
    assert main(["run", "--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample", "2", "--rounds",
                 "2", "--local-epochs", "1", "--batch-size", "64", "--lr", "1e6", "--alpha", "0.5",
                 "--algorithm", algorithm, "--no-baseline", "--no-progress", "--out", out]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [len(r["rejected"]) for r in records] == [2, 2]
    assert all("diverged" in rej["reason"] for r in records for rej in r["rejected"])
    with open(os.path.join(out, "run.log")) as f:
        assert "rejected the update of client" in f.read()
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rounds"] == 2
