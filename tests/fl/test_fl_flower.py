"""The Flower app (one ServerApp strategy and one ClientApp for every algorithm) driven in process through a fake
Grid (no Ray), against the in-process loop; and the same app on Flower's real simulation engine (Ray)."""

import json
import os

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from helpers_fl import tiny_config  # noqa: E402

from spafl_fl import SUMMARY_KEYS, Simulation  # noqa: E402
from spafl_fl.flower_app import app_config  # noqa: E402
from spafl_fl.flower_app.client import app as client_app  # noqa: E402
from spafl_fl.flower_app.messages import from_array_record, payload_bytes, to_array_record  # noqa: E402
from spafl_fl.flower_app.strategy import RunStrategy, drive  # noqa: E402
from spafl_fl.simulation import TIMING_KEYS  # noqa: E402


class FakeGrid(Grid):
    """Delivers each message straight to the ``ClientApp`` of its node, in this process. Node ids are
    not the partition ids (as in a real deployment), so the strategy has to ask."""

    def __init__(self, app, num_nodes: int, run_config: dict | None = None):
        self.app = app
        self.partition = {1000 + 7 * k: k for k in reversed(range(num_nodes))}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": k,
                                                                          "num-partitions": num_nodes},
                                      state=RecordDict(), run_config=dict(run_config or {}))
                         for nid, k in self.partition.items()}
        self.sent: list[Message] = []

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.partition)

    def push_messages(self, messages):
        raise NotImplementedError("FakeGrid answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("FakeGrid answers in send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            replies.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    """What a running ServerApp process knows about itself (instruction messages are stamped with it)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def app_grid(config, app=client_app, state_dir=None) -> FakeGrid:
    """A fake Grid whose nodes run the app's ClientApp with ``config`` as their run config."""
    grid = FakeGrid(app, config.clients, app_config(config))
    if state_dir is not None:
        for context in grid.contexts.values():
            context.node_config["state-dir"] = str(state_dir)
    return grid


def run_on_app(config, out=None, **kwargs):
    strategy = RunStrategy(config, out, **kwargs)
    grid = app_grid(config)
    drive(strategy, grid, timeout=30)
    return strategy, grid


def test_records_carry_raw_threshold_bytes():
    tensors = {"a.threshold": torch.randn(5), "b.threshold": torch.randn(3, dtype=torch.float64)}
    record = to_array_record(tensors)
    assert payload_bytes(record) == 5 * 4 + 3 * 8
    back = from_array_record(record)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


@pytest.mark.parametrize("algorithm, update", [("spafl", "lazy"), ("spafl", "eager"), ("fedavg", "lazy"),
                                               ("local", "lazy")])
def test_app_matches_the_loop(tmp_path, server_identity, algorithm, update):
    """The app's strategy and ClientApp in process: every algorithm gives the in-process loop's numbers and
    records with the very same keys (what Flower carried is null in the loop)."""
    config = tiny_config(rounds=2, measure_baseline=False, global_update=update, algorithm=algorithm)
    strategy, grid = run_on_app(config, str(tmp_path / "flower"))
    reference = Simulation(config)
    reference.run()
    for got, want in zip(strategy.records, reference.records, strict=True):
        assert set(got) == set(want)
        # Same clients, batches, initial model and averaging order: the very same numbers.
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS and "wire" not in k} == {
            k: v for k, v in want.items() if k not in TIMING_KEYS and "wire" not in k}
        assert got["uplink_wire_bits"] > got["uplink_bits"] and got["downlink_wire_bits"] > 0
        assert want["uplink_wire_bits"] is None
    with open(tmp_path / "flower" / "summary.json") as f:
        summary = json.load(f)
    assert tuple(summary) == SUMMARY_KEYS and summary == json.loads(json.dumps(strategy.finish_summary))
    sends = {m.metadata.message_type for m in grid.sent if m.content.array_records}
    assert sends == {"spafl": {"train"} if update == "lazy" else {"evaluate"}, "fedavg": {"train", "evaluate"},
                     "local": set()}[algorithm]


@pytest.mark.parametrize("algorithm", ["spafl", "fedavg", "local"])
def test_app_resumes_from_the_run_folder_and_the_nodes(tmp_path, server_identity, algorithm):
    """Round 1 in one run, round 2 resumed with fresh node memory: the uninterrupted run's numbers."""
    out, nodes = str(tmp_path / "run"), tmp_path / "nodes"
    first = tiny_config(rounds=1, measure_baseline=False, algorithm=algorithm)
    drive(RunStrategy(first, out), app_grid(first, state_dir=nodes), timeout=30)
    config = tiny_config(rounds=2, measure_baseline=False, algorithm=algorithm)
    with pytest.raises(FileExistsError):
        RunStrategy(config, out)
    resumed = RunStrategy(config, out, resume=True)
    assert resumed.rounds_done == 1
    drive(resumed, app_grid(config, state_dir=nodes), timeout=30)
    reference = Simulation(config)
    reference.run()
    assert [r["accuracy"] for r in resumed.records] == [r["accuracy"] for r in reference.records]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["round"] for line in f] == [1, 2]
    if algorithm != "fedavg":  # a personal model: a node without its saved state cannot resume
        other = RunStrategy(tiny_config(rounds=3, measure_baseline=False, algorithm=algorithm), out, resume=True)
        with pytest.raises(RuntimeError, match="holds no client state"):
            drive(other, app_grid(config, state_dir=tmp_path / "empty"), timeout=30)


def test_strategy_rejects_a_malformed_update(server_identity):
    config = tiny_config(rounds=1, measure_baseline=False)
    strategy = RunStrategy(config)
    victim = min(strategy.server.sample_clients(0))

    def tampering(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == victim:
            record = reply.content["update"]
            name = next(iter(record))
            record[name] = to_array_record({name: torch.full((2,), float("nan"))})[name]
        return reply

    drive(strategy, app_grid(config, app=tampering), timeout=30)
    rejected = strategy.records[0]["rejected"]
    assert [r["client"] for r in rejected] == [victim]
    assert "shape" in rejected[0]["reason"]


def test_strategy_rejects_a_diverged_client_and_keeps_failed_losses_out(server_identity):
    """A client whose training diverges says so in its reply; the strategy rejects it and the round completes."""
    for algorithm in ("spafl", "fedavg"):
        config = tiny_config(rounds=1, lr=1e6, measure_baseline=False, algorithm=algorithm)
        strategy, _ = run_on_app(config)
        record = strategy.records[0]
        assert sorted(r["client"] for r in record["rejected"]) == strategy.server.sample_clients(0)
        assert all("training diverged" in r["reason"] for r in record["rejected"])
        assert record["train_loss"] is None  # failed updates never enter the mean
        assert all(bool(torch.isfinite(t).all()) for t in strategy.server.tensors.values())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["spafl", "fedavg", "local"])
def test_cli_run_and_flower_give_the_same_metrics(tmp_path, algorithm):
    """Engine parity on Flower's real simulation engine (Ray), nothing pinned: the app carries the run's
    kernel path choices to every client process. Same seed and flags: same sampled clients, record keys and
    bits; accuracy equal up to float reordering."""
    from spafl_fl.cli import main

    flags = ["--dataset", "digits", "--model", "mlp", "--clients", "3", "--sample", "2", "--rounds", "2",
             "--local-epochs", "1", "--seed", "3", "--threads", "1", "--no-baseline", "--no-progress",
             "--algorithm", algorithm]
    assert main(["run", *flags, "--out", str(tmp_path / "run")]) == 0
    assert main(["flower", *flags, "--out", str(tmp_path / "flower")]) == 0

    def records(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    for got, want in zip(records("flower"), records("run"), strict=True):
        assert set(got) == set(want)
        assert got["sampled"] == want["sampled"] and got["uplink_bits"] == want["uplink_bits"]
        assert got["downlink_bits"] == want["downlink_bits"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)


@pytest.mark.parametrize("algorithm, optimizer, guard", [("spafl", "persistent", "after-step"),
                                                         ("spafl", "fresh", "before-forward"),
                                                         ("local", "persistent", "after-step")])
def test_app_keeps_the_optimizer_and_the_guard_as_the_loop_does(tmp_path, server_identity, algorithm, optimizer,
                                                                guard):
    """A kept optimizer (momentum) and the authors' collapse guard live in the client's state, so the app's
    nodes carry them between rounds, and through a resume, exactly as the in-process loop does."""
    # A strong penalty and a high floor, so that layers collapse and the two guards differ.
    options = dict(measure_baseline=False, algorithm=algorithm, client_optimizer=optimizer, collapse_guard=guard,
                   min_density=0.5, th_coeff=2.0, clients=3, sample=2)
    out, nodes = str(tmp_path / "run"), tmp_path / "nodes"
    first = tiny_config(rounds=2, **options)
    drive(RunStrategy(first, out), app_grid(first, state_dir=nodes), timeout=60)
    config = tiny_config(rounds=4, **options)
    resumed = RunStrategy(config, out, resume=True)
    drive(resumed, app_grid(config, state_dir=nodes), timeout=60)
    reference = Simulation(config)
    reference.run()
    got = [(r["accuracy"], r["train_loss"], r.get("mean_row_density")) for r in resumed.records]
    assert got == [(r["accuracy"], r["train_loss"], r.get("mean_row_density")) for r in reference.records]
    other = {"client_optimizer": "fresh", "collapse_guard": "after-step"}
    fresh = Simulation(tiny_config(rounds=4, **{**options, **other}))
    fresh.run()
    assert [r["train_loss"] for r in fresh.records] != [r["train_loss"] for r in reference.records]


def test_a_node_lost_before_evaluating_stops_the_run_with_its_name(server_identity):
    """A node that dies mid-run comes back as an error reply (no content): the strategy counts it as no
    bytes and stops the run naming the client, instead of failing on the missing content."""
    from flwr.app import Error

    from spafl_fl.flower_app.mods import message_bytes

    config = tiny_config(rounds=2, measure_baseline=False)
    grid = app_grid(config)
    lost = next(nid for nid, k in grid.partition.items() if k == 2)

    def app(message, context):
        if context.node_id == lost and message.metadata.message_type == "evaluate":
            return Message(Error(code=0, reason="node lost"), reply_to=message)
        return client_app(message, context)

    probe = Message(RecordDict(), dst_node_id=lost, message_type="evaluate")
    assert message_bytes(app(probe, grid.contexts[lost])) == 0
    grid.app = app
    with pytest.raises(RuntimeError, match=r"clients \[2\] did not evaluate"):
        drive(RunStrategy(config, None), grid, timeout=30)
