"""The server: sampling, and rejection of malformed updates."""

import logging

import torch

from spafl_fl import ClientUpdate, Server, update_problems

SPEC = {"a": torch.zeros(3), "b": torch.zeros(2)}


def _update(cid, tensors):
    return ClientUpdate(cid, tensors, num_samples=10, train_loss=0.0, train_seconds=0.0)


def test_problems_name_each_fault():
    good = {"a": torch.ones(3), "b": torch.ones(2)}
    assert update_problems(good, SPEC) == []
    assert "missing ['b']" in update_problems({"a": torch.ones(3)}, SPEC)[0]
    assert "unknown names ['c']" in update_problems({**good, "c": torch.ones(1)}, SPEC)[0]
    assert "shape (4,)" in update_problems({**good, "a": torch.ones(4)}, SPEC)[0]
    assert "dtype torch.float64" in update_problems({**good, "a": torch.ones(3, dtype=torch.float64)}, SPEC)[0]
    assert "non-finite" in update_problems({**good, "b": torch.tensor([1.0, float("nan")])}, SPEC)[0]
    assert "not a tensor" in update_problems({**good, "b": [1.0, 2.0]}, SPEC)[0]
    assert "mapping" in update_problems(None, SPEC)[0]


def test_malformed_updates_are_logged_and_the_rest_averaged(caplog):
    server = Server(SPEC, num_clients=6, sample=5, seed=0)
    updates = [
        _update(0, {"a": torch.full((3,), 1.0), "b": torch.full((2,), 2.0)}),
        _update(1, {"a": torch.full((3,), 3.0), "b": torch.full((2,), 4.0)}),
        _update(2, {"a": torch.full((3,), float("inf")), "b": torch.zeros(2)}),
        _update(3, {"a": torch.zeros(4), "b": torch.zeros(2)}),
        _update(4, {"x": torch.zeros(3), "b": torch.zeros(2)}),
    ]
    with caplog.at_level(logging.WARNING, logger="spafl_fl"):
        result = server.aggregate(updates, round_index=7)
    assert result.accepted == [0, 1]
    assert [k for k, _ in result.rejected] == [2, 3, 4]
    assert len([r for r in caplog.records if "rejected the update of client" in r.getMessage()]) == 3
    torch.testing.assert_close(result.tensors["a"], torch.full((3,), 2.0))
    torch.testing.assert_close(result.difference["b"], torch.full((2,), 3.0))


def test_nothing_valid_keeps_the_global_state():
    server = Server(SPEC, num_clients=2, sample=1, seed=0)
    result = server.aggregate([_update(0, {"a": torch.zeros(3)})])
    assert result.accepted == [] and torch.equal(result.tensors["a"], SPEC["a"])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in result.difference.values())


def test_fedavg_weights_by_samples_and_rounds_integer_buffers():
    spec = {"w": torch.zeros(1), "n": torch.zeros((), dtype=torch.long)}
    server = Server(spec, num_clients=2, sample=2, seed=0, weighting="samples")
    a = ClientUpdate(0, {"w": torch.tensor([1.0]), "n": torch.tensor(3)}, 30, 0.0, 0.0)
    b = ClientUpdate(1, {"w": torch.tensor([5.0]), "n": torch.tensor(5)}, 10, 0.0, 0.0)
    result = server.aggregate([a, b])
    torch.testing.assert_close(result.tensors["w"], torch.tensor([2.0]))
    assert result.tensors["n"].dtype == torch.long and int(result.tensors["n"]) == 4


def test_sampling_depends_on_seed_and_round_only():
    server = Server(SPEC, num_clients=100, sample=10, seed=3)
    again = Server(SPEC, num_clients=100, sample=10, seed=3)
    assert server.sample_clients(5) == again.sample_clients(5)
    assert len(set(server.sample_clients(5))) == 10
    assert server.sample_clients(5) != server.sample_clients(6)
