"""SpaFL as the paper runs it: lazy global update, Local baseline, both densities, the authors' FLOP
count, presets and input scale."""

import copy

import pytest
import torch
from helpers_fl import tiny_config

import spafl_kernels as sk
from spafl_fl import PRESETS, RunConfig, Simulation, build_model, summarize
from spafl_fl.accounting import FlopPlan, authors_flops
from spafl_fl.client import SpaFLClient
from spafl_fl.simulation import mean_row_density


def test_lazy_update_reaches_only_sampled_clients_when_they_train(monkeypatch):
    sim = Simulation(tiny_config(clients=5, sample=2, rounds=3, measure_baseline=False))
    assert sim.config.global_update == "lazy"  # the default
    calls = []
    original = SpaFLClient.receive_global

    def spy(client, tensors):
        calls.append((client.cid, {k: v.clone() for k, v in tensors.items()}))
        return original(client, tensors)

    monkeypatch.setattr(SpaFLClient, "receive_global", spy)
    n_bits = 32 * (300 + 100)  # the two sparse layers' thresholds; the dense classifier is never sent
    for r in range(3):
        start = {k: v.clone() for k, v in sim.server.tensors.items()}
        held = {c.cid: copy.deepcopy(c.global_thresholds) for c in sim.clients}
        models = {c.cid: copy.deepcopy(c.model) for c in sim.clients}
        calls.clear()
        record = sim.run_round(r)
        # Only the sampled clients got the global thresholds, at the start of the round.
        assert [cid for cid, _ in calls] == record["sampled"]
        assert all(all(torch.equal(t[k], start[k]) for k in start) for _, t in calls)
        assert record["downlink_bits"] == n_bits * 2 and record["uplink_bits"] == n_bits * 2
        for client in sim.clients:
            if client.cid in record["sampled"]:
                assert all(torch.equal(client.global_thresholds[k], start[k]) for k in start)
            else:  # untouched: no update, no training, still the old global thresholds
                assert all(torch.equal(client.global_thresholds[k], held[client.cid][k]) for k in start)
                assert all(torch.equal(a, b) for a, b in zip(client.model.state_dict().values(),
                                                               models[client.cid].state_dict().values()))


def test_lazy_receive_applies_the_sum_of_the_missed_differences():
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    client = SpaFLClient(0, copy.deepcopy(model), None)
    g0 = client.global_thresholds
    g1 = {k: v + 0.01 for k, v in g0.items()}
    g2 = {k: v - 0.03 for k, v in g1.items()}
    client.receive_global(g2)  # missed g1: applies g2 - g0 at once
    expected = copy.deepcopy(model)
    sk.apply_threshold_update(expected, {k: g2[k] - g0[k] for k in g0})
    assert all(torch.equal(a, b) for a, b in zip(client.model.parameters(), expected.parameters()))
    assert all(torch.equal(client.global_thresholds[k], g2[k]) for k in g0)


def test_eager_and_lazy_bits_at_100_clients():
    lazy = Simulation(tiny_config(clients=100, sample=10, dataset="synthetic", measure_baseline=False,
                                  local_epochs=1))
    record = lazy.run_round(0)
    thr = 32 * lazy.num_thresholds
    assert record["downlink_bits"] == thr * 10
    summary = summarize([record], "spafl")
    fedavg = 2 * summary["dense_uplink_bits"]
    assert fedavg / (summary["uplink_bits"] + summary["downlink_bits"]) == pytest.approx(
        lazy.dense_state_bits / thr)


def test_local_baseline_trains_own_dense_models_and_sends_nothing():
    sim = Simulation(tiny_config(algorithm="local", rounds=2, measure_baseline=False))
    init = copy.deepcopy(sim.clients[0].model)
    assert not list(sk.sparse_layers(init))
    records = [sim.run_round(r) for r in range(2)]
    for record in records:
        assert record["uplink_bits"] == record["downlink_bits"] == 0
        assert record["dense_uplink_bits"] > 0
        assert record["weight_density"] == record["mean_row_density"] == 1.0
        assert record["train_flops"] == record["dense_train_flops"] > 0
        assert record["authors_train_flops"] > 0
    trained = {k for rec in records for k in rec["sampled"]}
    for client in sim.clients:
        same = all(torch.equal(a, b) for a, b in zip(client.model.parameters(), init.parameters()))
        assert same == (client.cid not in trained)  # personal models: only the trained ones moved


def test_both_densities_are_recorded_and_differ():
    sim = Simulation(tiny_config(rounds=1, measure_baseline=False))
    record = sim.run_round(0)
    dens = record["density"]
    assert record["weight_density"] == dens["total"]
    assert set(dens) == {"hidden.0", "hidden.1", "total"}  # the dense classifier is no sparse layer
    assert record["mean_row_density"] == pytest.approx((dens["hidden.0"] + dens["hidden.1"]) / 2)
    summary = summarize([record], "spafl")
    assert summary["weight_density"] == summary["density"] == dens["total"]
    assert summary["mean_row_density"] == record["mean_row_density"]
    with torch.no_grad():
        for client in sim.clients:
            client.model.hidden[0].threshold[:270] = 10.0  # 10 % of the big first layer's rows left
    _, _, dens = sim._evaluate()
    # The first layer holds most weights: the weighted measure is far below the per-layer mean.
    assert dens["total"] < 0.25 < 0.5 < mean_row_density(dens)


def test_authors_flops_match_their_formula_on_lenet5():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    with torch.no_grad():
        model.conv2.threshold[:25] = 10.0  # half of conv2's 50 filters pruned
        model.fc3.threshold[:400] = 10.0  # 100 of fc3's 500 rows left
    plan = FlopPlan(model, torch.zeros(2, 1, 28, 28))
    n, epochs, batches = 37, 5, 3
    # conv1: 20 x 1 x 5x5 over 24x24; conv2: 50 x 20 x 5x5 over 8x8; fc3: 800 -> 500; fc4: 500 -> 10
    forward = 20 * 25 * 24 * 24 + 0.5 * 50 * 20 * 25 * 8 * 8 + 0.2 * 800 * 500 + 500 * 10
    weights = 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10
    want = 3 * epochs * n * forward + (20 + 50 + 500 + 10) * batches + weights
    assert authors_flops(plan, model, n, epochs, batches) == pytest.approx(want)


def test_authors_flops_in_a_run_are_averaged_over_all_clients():
    sim = Simulation(tiny_config(clients=4, sample=2, rounds=1, measure_baseline=False))
    record = sim.run_round(0)
    assert record["authors_train_flops"] > 0
    assert record["authors_flops_per_client"] == pytest.approx(record["authors_train_flops"] / 4)


def test_presets_set_the_paper_values_and_overrides_win():
    config = RunConfig.from_preset("fmnist-lenet5", dataset="mnist5k", rounds=3)
    assert (config.dataset, config.model, config.ste, config.lr, config.batch_size, config.local_epochs,
            config.alpha, config.th_coeff, config.clients, config.sample, config.momentum, config.clip) == (
        "mnist5k", "lenet5", "identity", 1e-3, 64, 5, 0.2, 2e-3, 100, 10, 0.9, 0.0)
    assert config.rounds == 3 and config.preset == "fmnist-lenet5" and config.th_warmup == 1
    conv4 = RunConfig.from_preset("cifar10-conv4")
    assert (conv4.ste, conv4.clip, conv4.lr, conv4.batch_size, conv4.th_coeff) == ("outer", 3.0, 1e-2, 16, 1.5e-4)
    resnet = RunConfig.from_preset("cifar100-resnet18")
    assert (resnet.clip, resnet.lr_decay, resnet.local_epochs, resnet.th_coeff, resnet.rounds) == (
        15.0, 0.993, 7, 7e-4, 1500)
    assert set(PRESETS) == {"fmnist-lenet5", "cifar10-conv4", "cifar10-vit", "cifar100-resnet18"}
    with pytest.raises(ValueError, match="preset must be one of"):
        RunConfig.from_preset("mnist-mlp")
    with pytest.raises(ValueError, match="global_update"):
        tiny_config(global_update="sometimes")


def test_input_scale_multiplies_the_client_images():
    plain = Simulation(tiny_config(rounds=0))
    scaled = Simulation(tiny_config(rounds=0, input_scale=255.0))
    for a, b in zip(plain.client_data, scaled.client_data):
        assert torch.equal(a.x_train * 255.0, b.x_train) and torch.equal(a.x_test * 255.0, b.x_test)
        assert torch.equal(a.y_train, b.y_train)
