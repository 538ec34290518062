"""The authors' behaviours as options of the federated loop: lazy-last, persistent client optimizer,
collapse guard before the forward, their split and sampling, their batch order; each against an
independent statement of what their code does."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from helpers_fl import tiny_config, tiny_flags

import spafl_kernels as sk
from spafl_fl import Simulation, build_model
from spafl_fl.cli import main
from spafl_fl.client import ForwardGuard, LocalTraining, SpaFLClient, loader_pass, make_optimizer, train_local
from spafl_fl.config import RunConfig, run_only_problems
from spafl_fl.data import ClientData, Dataset, holdout_test, load_synthetic, split_authors

AUTHORS = dict(split="authors", client_optimizer="persistent", collapse_guard="before-forward",
               global_update="lazy-last", batch_order="authors")


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_lazy_last_applies_only_the_given_difference():
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    client = SpaFLClient(0, copy.deepcopy(model), None)
    g0 = client.global_thresholds
    g2 = {k: v + 0.05 for k, v in g0.items()}
    last = {k: torch.full_like(v, -0.02) for k, v in g0.items()}
    client.receive_global(g2, last)  # missed a round: still only the last round's difference
    expected = copy.deepcopy(model)
    sk.apply_threshold_update(expected, last)
    assert _params_equal(client.model, expected)
    assert all(torch.equal(client.global_thresholds[k], g2[k]) for k in g0)


def test_lazy_last_round_uses_the_previous_aggregate_difference(monkeypatch):
    sim = Simulation(tiny_config(clients=5, sample=2, rounds=3, measure_baseline=False, global_update="lazy-last"))
    seen = []
    original = SpaFLClient.receive_global

    def spy(client, tensors, difference=None):
        seen.append({k: v.clone() for k, v in difference.items()})
        return original(client, tensors, difference)

    monkeypatch.setattr(SpaFLClient, "receive_global", spy)
    previous = {k: torch.zeros_like(v) for k, v in sim.server.tensors.items()}  # nothing before round 0
    for r in range(3):
        start = {k: v.clone() for k, v in sim.server.tensors.items()}
        seen.clear()
        record = sim.run_round(r)
        assert len(seen) == 2 and all(torch.equal(d[k], previous[k]) for d in seen for k in d)
        # Global thresholds and the difference go down: twice the thresholds' bits per sampled client.
        assert record["downlink_bits"] == 2 * 2 * 32 * sim.num_thresholds
        previous = {k: sim.server.tensors[k] - start[k] for k in start}


def test_lazy_and_lazy_last_differ_once_a_client_missed_rounds():
    runs = {}
    for update in ("lazy", "lazy-last"):
        sim = Simulation(tiny_config(clients=4, sample=1, rounds=6, measure_baseline=False, global_update=update))
        sim.run()
        runs[update] = sim
    assert any(not _params_equal(a.model, b.model) for a, b in zip(runs["lazy"].clients, runs["lazy-last"].clients))


def _data(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ClientData(torch.rand(n, 1, 28, 28, generator=gen), torch.randint(10, (n,), generator=gen),
                      torch.rand(4, 1, 28, 28, generator=gen), torch.randint(10, (4,), generator=gen))


def test_a_kept_optimizer_continues_its_momentum_across_rounds():
    data, hp = _data(), LocalTraining(epochs=1, batch_size=8, lr=0.05, th_coeff=0.002)
    batches = list(torch.randperm(40, generator=torch.Generator().manual_seed(1)).split(8))
    init = build_model("mlp", (1, 28, 28), 10, seed=0)
    once = copy.deepcopy(init)
    train_local(once, data, batches, hp, sparse=True)  # one call: momentum flows through every step
    kept = copy.deepcopy(init)
    opt = make_optimizer(kept, hp)
    train_local(kept, data, batches[:2], hp, sparse=True, optimizer=opt)
    train_local(kept, data, batches[2:], hp, sparse=True, optimizer=opt)
    assert _params_equal(kept, once)
    fresh = copy.deepcopy(init)  # a new optimizer per call drops the momentum in between
    train_local(fresh, data, batches[:2], hp, sparse=True)
    train_local(fresh, data, batches[2:], hp, sparse=True)
    assert not _params_equal(fresh, once)


def test_zero_momentum_buffers_equal_a_new_optimizer():
    # What a resumed run restores for a client that has not stepped yet must change nothing.
    data, hp = _data(), LocalTraining(epochs=1, batch_size=8, lr=0.05, th_coeff=0.002)
    batches = list(torch.arange(40).split(8))
    a = SpaFLClient(0, build_model("mlp", (1, 28, 28), 10, seed=0), data, persistent=True)
    b = SpaFLClient(0, build_model("mlp", (1, 28, 28), 10, seed=0), data, persistent=True)
    b.load_momentum(a.momentum(), hp)
    assert all(float(t.abs().sum()) == 0 for t in a.momentum().values())
    a.fit(hp, batches)
    b.fit(hp, batches)
    assert _params_equal(a.model, b.model)
    assert all(torch.equal(a.momentum()[k], b.momentum()[k]) for k in a.momentum())


def test_forward_guard_resets_at_the_forward_after_a_collapsed_one():
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    guard = ForwardGuard(model, 0.01)
    layer = model.hidden[0]
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # every row pruned
    assert guard.before_forward(model) == []  # the previous forward (none yet) kept all rows
    assert guard.last["hidden.0"] == 0.0 and float(layer.threshold.detach()[0]) == 10.0
    assert guard.before_forward(model) == ["hidden.0"]  # this forward follows a collapsed one
    assert float(layer.threshold.abs().sum()) == 0 and guard.last["hidden.0"] == 1.0


def test_forward_guard_runs_before_evaluation_and_not_after_steps():
    data = _data()
    client = SpaFLClient(0, build_model("mlp", (1, 28, 28), 10, seed=0), data,
                         guard=ForwardGuard(build_model("mlp", (1, 28, 28), 10, seed=0), 0.01))
    with torch.no_grad():
        client.model.hidden[1].threshold.fill_(10.0)
    client.guard.last["hidden.1"] = 0.0  # the last forward (say, the last training step) had fc3 collapsed
    client.evaluate()
    assert float(client.model.hidden[1].threshold.abs().sum()) == 0  # their test forward resets it first
    # In training, a layer driven to collapse by a step is not reset after that step (reset_collapsed is not
    # called): it is reset at the next forward.
    hp = LocalTraining(epochs=1, batch_size=40, lr=0.0, th_coeff=0.0)
    with torch.no_grad():
        client.model.hidden[1].threshold.fill_(10.0)
    client.guard.last["hidden.1"] = 1.0
    train_local(client.model, data, [torch.arange(40)], hp, sparse=True, guard=client.guard)
    assert float(client.model.hidden[1].threshold[0]) == 10.0 and client.guard.last["hidden.1"] == 0.0


def _their_split(labels, test_labels, clients, alpha, seed):
    """Their Non_iid_split, written from their code's description: numpy's global generator."""
    np.random.seed(seed)
    tr, te = [[] for _ in range(clients)], [[] for _ in range(clients)]
    for label in range(10):
        p = np.random.dirichlet(np.repeat(alpha, clients))
        for labs, batch in ((labels, tr), (test_labels, te)):
            idx = np.where(labs == label)[0]
            np.random.shuffle(idx)
            for j, part in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
                batch[j] += part.tolist()
    for j in range(clients):
        np.random.shuffle(tr[j])
    picks = [np.random.choice(clients, 3, replace=False).tolist() for _ in range(4)]
    return tr, te, picks


def test_authors_split_and_sampling_draw_for_draw():
    data = holdout_test(load_synthetic(num_samples=600, seed=2))
    tr, te, picks = _their_split(data.y.numpy(), data.y_test.numpy(), 6, 0.5, 7)
    clients, rng = split_authors(data, 6, 0.5, 7)
    for k, c in enumerate(clients):
        assert torch.equal(c.x_train, data.x[tr[k]]) and torch.equal(c.y_test, data.y_test[te[k]])
    assert [[int(k) for k in rng.choice(6, 3, replace=False)] for _ in range(4)] == picks
    sim = Simulation(tiny_config(clients=6, sample=3, rounds=4, alpha=0.5, seed=7, split="authors",
                                 measure_baseline=False))
    synthetic = holdout_test(load_synthetic(seed=7))  # tiny_config's dataset, seeded by the run's seed
    assert sim.schedule == _their_split(synthetic.y.numpy(), synthetic.y_test.numpy(), 6, 0.5, 7)[2]


def test_holdout_test_keeps_the_last_fifth_of_each_class():
    y = torch.tensor([0] * 10 + [1] * 5 + [0] * 5)
    data = holdout_test(Dataset("d", torch.arange(20.0).view(20, 1, 1, 1), y, 2))
    assert data.y_test.tolist() == [0, 0, 0, 1] and data.x_test.flatten().tolist() == [17.0, 18.0, 19.0, 14.0]
    assert len(data.y) == 16 and holdout_test(data) is data  # a test set is kept as it is


def test_loader_pass_draws_like_a_shuffling_dataloader():
    torch.manual_seed(5)
    gen = torch.Generator()
    gen.set_state(torch.get_rng_state())
    loader = torch.utils.data.DataLoader(torch.arange(23), batch_size=8, shuffle=True)
    theirs = [b for _ in range(3) for b in loader]  # three epochs through torch's global generator
    ours = [b for _ in range(3) for b in loader_pass(gen, 23, 8)]
    assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]
    assert torch.equal(gen.get_state(), torch.get_rng_state())


@pytest.mark.parametrize("options", [AUTHORS, dict(AUTHORS, algorithm="local")])
def test_resume_with_the_authors_options_matches_uninterrupted(tmp_path, options):
    def config(rounds):
        return tiny_config(rounds=rounds, measure_baseline=False, **options)

    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    Simulation(config(3), whole).run()
    Simulation(config(2), split).run()
    Simulation(config(3), split, resume=True).run()

    def records(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in f]

    assert records(split) == records(whole)


def test_a_run_saved_before_these_settings_existed_resumes(tmp_path):
    out = str(tmp_path / "run")
    Simulation(tiny_config(rounds=1, measure_baseline=False), out).run()
    pointer = os.path.join(out, "checkpoint.json")
    with open(pointer) as f:
        meta = json.load(f)
    for key in ("split", "client_optimizer", "collapse_guard", "batch_order"):
        del meta["meta"]["config"][key]
    with open(pointer, "w") as f:
        json.dump(meta, f)
    assert Simulation(tiny_config(rounds=2, measure_baseline=False), out, resume=True).rounds_done == 1


def test_flags_reach_the_config_and_flower_refuses_the_run_only_ones(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = ["--split", "authors", "--client-optimizer", "persistent", "--collapse-guard", "before-forward",
             "--global-update", "lazy-last", "--batch-order", "authors"]
    assert main(["run", *tiny_flags(1), *flags, "--out", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in AUTHORS} == AUTHORS
    assert len(run_only_problems(RunConfig(**AUTHORS).to_dict())) == 3  # split, batch order, lazy-last
    with pytest.raises(SystemExit):
        main(["flower", *tiny_flags(1), "--split", "authors", "--out", str(tmp_path / "f")])
    assert "--split authors runs only in spafl-fl run" in capsys.readouterr().err
