"""One round of SpaFL and of FedAvg, and the accounting they report."""

import copy

import pytest
import torch
from helpers_fl import tiny_config

import spafl_kernels as sk
from spafl_fl import SUMMARY_KEYS, Simulation, build_model, summarize
from spafl_fl.accounting import FlopPlan, dense_state, tensor_bits, total_flops
from spafl_fl.client import SpaFLClient, set_backend
from spafl_kernels.flops import FlopCounter


@pytest.fixture(scope="module")
def spafl_round():
    sim = Simulation(tiny_config(clients=5, sample=3, global_update="eager"))
    before = [copy.deepcopy(c.model) for c in sim.clients]
    record = sim.run_round(0)
    return sim, before, record


def test_spafl_round_moves_thresholds_and_sends_only_them(spafl_round):
    sim, before, record = spafl_round
    n_thresholds = sum(layer.threshold.numel() for _, layer in sk.sparse_layers(sim.clients[0].model))
    assert n_thresholds == 300 + 100  # the classifier (10 rows) stays dense by default
    assert record["uplink_bits"] == 32 * n_thresholds * 3
    assert record["downlink_bits"] == 32 * n_thresholds * 5  # eager: new global thresholds to every client
    assert record["dense_uplink_bits"] == tensor_bits(dense_state(sim.clients[0].model)) * 3
    assert record["dense_uplink_bits"] == 32 * (784 * 300 + 300 * 100 + 100 * 10) * 3
    assert record["rejected"] == []
    assert any(float(t.abs().max()) > 0 for t in sim.server.tensors.values())
    for client, old in zip(sim.clients, before):
        # every client, sampled or not, holds the new global thresholds and got the weight update
        assert all(torch.equal(client.global_thresholds[k], sim.server.tensors[k]) for k in sim.server.tensors)
        assert not torch.equal(client.model.hidden[0].weight, old.hidden[0].weight)
    for client, old in zip(sim.clients, before):
        if client.cid not in record["sampled"]:
            # an unsampled client keeps its own thresholds until it is sampled
            assert torch.equal(client.model.hidden[1].threshold, old.hidden[1].threshold)


def test_spafl_round_accounting(spafl_round):
    _, _, record = spafl_round
    assert 0 < record["accuracy"] <= 100 and record["loss"] > 0
    assert set(record["density"]) == {"hidden.0", "hidden.1", "total"}  # the dense classifier has no density
    assert 0 < record["train_flops"] <= record["dense_train_flops"]
    assert record["paper_train_flops"] > 0
    assert record["train_seconds"] > 0 and record["baseline_train_seconds"] > 0
    summary = summarize([record], "spafl")
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["uplink_bits"] == record["uplink_bits"] and summary["rounds"] == 1


def test_fedavg_round_sends_full_state():
    sim = Simulation(tiny_config(algorithm="fedavg"))
    record = sim.run_round(0)
    state_bits = 32 * (784 * 300 + 300 * 100 + 100 * 10)
    assert record["uplink_bits"] == record["dense_uplink_bits"] == state_bits * 2
    assert record["downlink_bits"] == state_bits * 2
    assert record["density"] == {"total": 1.0}
    assert record["train_flops"] == record["dense_train_flops"]
    # the paper counts backward = 2 x forward even where the input needs no gradient
    assert record["paper_train_flops"] >= record["dense_train_flops"]
    assert record["baseline_train_seconds"] is None
    assert all(torch.equal(v, sim.server.tensors[k]) for k, v in sim.global_model.state_dict().items())


def test_flop_plan_matches_the_library_counter():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    with torch.no_grad():
        model.conv2.threshold.fill_(1.0)  # prune conv2 entirely
        model.fc3.threshold[:250] = 1.0
    x = torch.randn(4, 1, 28, 28)
    plan = FlopPlan(model, x[:2])
    with FlopCounter(model, dead_inputs=False) as counter:  # the plan counts skipped rows, not dead inputs
        model(x)
    assert total_flops(plan.step(model, 4)) == counter.total
    assert counter.total.train < counter.total.dense_train
    # masked dense (reference) skips nothing: it executes the dense count; the paper's formula is unchanged
    set_backend(model, "reference")
    masked = total_flops(plan.step(model, 4))
    assert masked.train == masked.dense_train == counter.total.dense_train
    assert masked.paper_train == counter.total.paper_train


def test_client_replay_times_the_reference_backend(monkeypatch):
    sim = Simulation(tiny_config())
    used = []
    original = sk.sparse_linear

    def spy(*args, **kwargs):
        used.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr("spafl_kernels.modules.sparse_linear", spy)
    client: SpaFLClient = sim.clients[0]
    from spafl_fl import make_batches

    batches = make_batches(client.data.num_train, 1, 64, torch.Generator().manual_seed(0))
    update = client.fit(sim.config.local_training(0), batches, measure_baseline=True)
    assert update.baseline_seconds > 0
    n_sparse = len(list(sk.sparse_layers(client.model)))
    assert n_sparse == 2  # hidden.0, hidden.1; the classifier stays dense
    assert used.count("reference") == used.count("auto") == n_sparse * len(batches)
    assert all(layer.backend == "auto" for _, layer in sk.sparse_layers(client.model))


def test_malformed_client_update_is_rejected_in_a_run(monkeypatch):
    sim = Simulation(tiny_config())
    victim = sim.server.sample_clients(0)[0]
    honest_fit = sim.clients[victim].fit

    def broken_fit(*args, **kwargs):
        update = honest_fit(*args, **kwargs)
        update.tensors["hidden.1"] = torch.full_like(update.tensors["hidden.1"], float("nan"))
        return update

    monkeypatch.setattr(sim.clients[victim], "fit", broken_fit)
    record = sim.run_round(0)
    assert record["rejected"] == [{"client": victim, "reason": "hidden.1: non-finite values"}]
    assert all(torch.isfinite(t).all() for t in sim.server.tensors.values())
