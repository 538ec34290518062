"""SpaFL on Flower: the strategy and client app driven in process through a fake Grid (no Ray), and
one run on Flower's real simulation engine (Ray) against the in-process loop."""

import json
import os
import time

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from helpers_fl import tiny_config  # noqa: E402

from spafl_fl import SUMMARY_KEYS, Simulation  # noqa: E402
from spafl_fl.flower import (  # noqa: E402
    SpaFLStrategy,
    client_app,
    from_array_record,
    payload_bytes,
    run_flower_simulation,
    to_array_record,
)


class FakeGrid(Grid):
    """Delivers each message straight to the ``ClientApp`` of its node, in this process. Node ids are
    not the partition ids (as in a real deployment), so the strategy has to ask."""

    def __init__(self, app, num_nodes: int):
        self.app = app
        self.partition = {1000 + 7 * k: k for k in reversed(range(num_nodes))}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": k,
                                                                          "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={})
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


def test_records_carry_raw_threshold_bytes():
    tensors = {"a.threshold": torch.randn(5), "b.threshold": torch.randn(3, dtype=torch.float64)}
    record = to_array_record(tensors)
    assert payload_bytes(record) == 5 * 4 + 3 * 8
    back = from_array_record(record)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


@pytest.mark.parametrize("update", ["lazy", "eager"])
def test_strategy_in_process_matches_the_loop(tmp_path, server_identity, update):
    config = tiny_config(rounds=3, measure_baseline=False, global_update=update)
    strategy = SpaFLStrategy(config, str(tmp_path / "flower"))
    grid = FakeGrid(client_app(config), config.clients)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=config.rounds)
    summary = strategy.finish()
    reference = Simulation(config)
    reference.run()
    assert [r["sampled"] for r in strategy.records] == [r["sampled"] for r in reference.records]
    for got, want in zip(strategy.records, reference.records, strict=True):
        # Same clients, batches, initial model and averaging order: the very same numbers.
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
        assert got["density"] == pytest.approx(want["density"])
        assert got["train_flops"] == want["train_flops"]
        assert got["uplink_bits"] == want["uplink_bits"] and got["downlink_bits"] == want["downlink_bits"]
        for key in ("weight_density", "mean_row_density", "authors_train_flops", "authors_flops_per_client"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
    payload = reference.num_thresholds * 4  # float32 thresholds
    for record in strategy.records:
        assert set(record["uplink_bytes_per_client"].values()) == {payload}
        # lazy: the thresholds go down to the sampled clients only; eager: to every client
        assert record["downlink_bits"] == 8 * payload * (config.sample if update == "lazy" else config.clients)
    # The thresholds go down in the train instructions (lazy) or in the evaluate broadcast (eager), never both.
    carrying = {m.metadata.message_type for m in grid.sent if m.content.array_records}
    assert carrying == ({"train"} if update == "lazy" else {"evaluate"})
    assert tuple(summary) == SUMMARY_KEYS
    with open(tmp_path / "flower" / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))


def test_local_baseline_on_flower_matches_the_loop(server_identity):
    config = tiny_config(algorithm="local", rounds=2, measure_baseline=False)
    strategy = SpaFLStrategy(config)
    grid = FakeGrid(client_app(config), config.clients)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=config.rounds)
    reference = Simulation(config)
    reference.run()
    for got, want in zip(strategy.records, reference.records, strict=True):
        assert got["sampled"] == want["sampled"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
        assert got["uplink_bits"] == got["downlink_bits"] == want["uplink_bits"] == want["downlink_bits"] == 0
        assert got["mean_row_density"] == got["weight_density"] == 1.0
        assert got["authors_train_flops"] == pytest.approx(want["authors_train_flops"], rel=1e-12)
    assert not any(m.content.array_records for m in grid.sent)


def test_strategy_rejects_a_malformed_update(server_identity):
    config = tiny_config(rounds=1, measure_baseline=False)
    app = client_app(config)

    def tampering(message, context):
        reply = app(message, context)
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == min(
                strategy.server.sample_clients(0)):
            record = reply.content["thresholds"]
            name = next(iter(record))
            record[name] = to_array_record({name: torch.full((2,), float("nan"))})[name]
        return reply

    strategy = SpaFLStrategy(config)
    strategy.start(FakeGrid(tampering, config.clients), strategy.initial_arrays(), num_rounds=1)
    rejected = strategy.records[0]["rejected"]
    assert [r["client"] for r in rejected] == [min(strategy.server.sample_clients(0))]
    assert "shape" in rejected[0]["reason"]


def test_flower_simulation_engine_matches_the_loop(tmp_path):
    """The real engine: Ray, 4 virtual SuperNodes, 2 rounds."""
    config = tiny_config(rounds=2, clients=4, sample=2, measure_baseline=False)
    start = time.perf_counter()
    strategy = run_flower_simulation(config, str(tmp_path / "flower"), num_cpus=2, object_store_mb=100)
    seconds = time.perf_counter() - start
    print(f"Flower simulation: {seconds:.1f} s")
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert os.path.isfile(tmp_path / "flower" / name), name
    with open(tmp_path / "flower" / "summary.json") as f:
        summary = json.load(f)
    assert tuple(summary) == SUMMARY_KEYS and summary["rounds"] == 2
    reference = Simulation(config)
    reference.run()
    payload = reference.num_thresholds * 4
    for got, want in zip(strategy.records, reference.records, strict=True):
        assert got["sampled"] == want["sampled"]
        assert set(got["uplink_bytes_per_client"].values()) == {payload}
        assert got["uplink_bits"] == 8 * payload * config.sample == want["uplink_bits"]
        # Ray's actors may run another number of threads: equal up to float reordering.
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1.0)


def test_strategy_rejects_a_diverged_client(server_identity):
    """A client whose training diverges says so in its reply; the strategy rejects it and the round completes."""
    config = tiny_config(rounds=1, lr=1e6, measure_baseline=False)
    strategy = SpaFLStrategy(config)
    strategy.start(FakeGrid(client_app(config), config.clients), strategy.initial_arrays(), num_rounds=1)
    rejected = strategy.records[0]["rejected"]
    assert sorted(r["client"] for r in rejected) == strategy.server.sample_clients(0)
    assert all("training diverged" in r["reason"] for r in rejected)
    assert all(bool(torch.isfinite(t).all()) for t in strategy.server.tensors.values())


def test_cli_run_and_flower_give_identical_metrics(tmp_path, capsys, monkeypatch):
    """Engine parity: same seed and config, lazy update, one thread: `spafl-fl run` and `spafl-fl flower`
    (Ray) write the very same metrics, timings aside. The cpp path is pinned: each Ray worker would
    otherwise time its own first-sight choices, whose rounding differs in the last bits."""
    monkeypatch.setenv("SPAFL_CPU_PATH", "skip")
    from spafl_fl.cli import main
    from spafl_fl.simulation import TIMING_KEYS

    flags = ["--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample", "2", "--rounds", "3",
             "--local-epochs", "1", "--batch-size", "64", "--lr", "0.05", "--alpha", "0.5", "--seed", "3",
             "--threads", "1", "--no-baseline", "--no-progress", "--global-update", "lazy"]
    assert main(["run", *flags, "--out", str(tmp_path / "run")]) == 0
    assert main(["flower", *flags, "--out", str(tmp_path / "flower")]) == 0

    def records(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k not in (*TIMING_KEYS, "uplink_bytes_per_client")}
                    for line in f]

    assert records("flower") == records("run")
