"""The deployment's server side: SpaFL (``DeployedSpaFL``, the simulation's ``SpaFLStrategy`` plus
checkpoints, resume and wire accounting) and FedAvg (``FedAvgStrategy``), driven round by round by
``drive`` against a Flower ``Grid``.

Records (metrics.jsonl) keep the keys of ``spafl-fl run``, so that runs compare: ``uplink_bits`` /
``downlink_bits`` are the array payloads the algorithm needs (SpaFL: thresholds up from the sampled
clients, the new global thresholds down to every client; FedAvg: the state down to and up from the
sampled clients), exactly as the in-process loop counts them. Beside them, what Flower carried:

- ``uplink_wire_bits`` / ``downlink_wire_bits``: every message of the round (instructions, broadcasts,
  replies; FedAvg's evaluation broadcast of the global model included) as Flower serialises it,
  metadata and record names included (``mods.message_bytes``), per direction;
- ``client_compute_seconds`` / ``client_cpu_seconds``: the clients' handler time from ``wire_mod``
  (training, evaluation, model loading), apart from the round's ``wall_seconds``, which also holds
  the network, the SuperLink's queues and the start of each ClientApp process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from spafl_kernels.flops import LayerFlops

from ..accounting import dense_state, tensor_bits
from ..checkpoint import atomic_write_text, save_checkpoint
from ..config import RunConfig
from ..flower import CONFIG, SpaFLStrategy, _Round, payload_bytes, to_array_record
from ..rundir import (
    DEPLOYMENT_FOLDER,
    check_resume_tensors,
    claim_out_dir,
    clear_outputs,
    deployment_output,
    read_resume,
)
from ..rundir import METRICS as METRICS_FILE
from ..server import Server
from ..simulation import average_evaluation, describe_run, prepare_run, summarize
from .mods import message_bytes, wire_metrics
from .persist import DEPLOY

log = logging.getLogger("spafl_fl")

ARRAYS = "arrays"
"""FedAvg's record of the global model (instructions) and of a client's trained state (replies)."""
ENGINE = "flower-deployment"
DEPLOYED_ALGORITHMS = ("spafl", "fedavg")


class RunFolder:
    """What both strategies do with their output folder: config.json, metrics.jsonl, a checkpoint
    after every round (the server's tensors), resume from it, summary.json and the plots; and the
    round's wire accounting (``drive`` fills ``wire``)."""

    config: RunConfig
    server: Server
    records: list[dict]
    out_dir: str | None
    label: str

    def open_folder(self, description: dict, resume: bool, overwrite: bool = False) -> None:
        """Claim ``out_dir`` as ``spafl-fl run`` does (new or empty, unless ``resume``: continue the run there,
        or ``overwrite``: replace what a run wrote; ``deploy-local``'s own ``deployment`` folder aside),
        resume from it, write config.json."""
        self.rounds_done = 0
        self.wire = _new_wire()
        if self.out_dir is None:
            return
        claim_out_dir(self.out_dir, resume=resume, overwrite=overwrite, outputs=deployment_output,
                      ignore=(DEPLOYMENT_FOLDER,), what="what a previous run wrote (resume = true continues it)")
        if overwrite:
            clear_outputs(self.out_dir, deployment_output)
        os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            self._resume()
        atomic_write_text(os.path.join(self.out_dir, "config.json"),
                          json.dumps({**description, "engine": ENGINE}, indent=1))

    def _resume(self) -> None:
        """The in-process loop's resume (``read_resume``, ``check_resume_tensors``): every file checked,
        errors naming it."""
        rounds_done, tensors, records = read_resume(self.out_dir, self.config.to_dict())
        check_resume_tensors(self.out_dir, rounds_done, tensors,
                             {f"server.{name}": t for name, t in self.server.tensors.items()})
        self.server.tensors = {name[len("server."):]: t for name, t in tensors.items() if name.startswith("server.")}
        self.records = records
        atomic_write_text(os.path.join(self.out_dir, METRICS_FILE), "".join(json.dumps(rec) + "\n" for rec in records))
        self.rounds_done = rounds_done
        log.info("resuming %s after round %d", self.out_dir, rounds_done)

    def round_extras(self, server_round: int) -> dict:
        wire, self.wire = self.wire, _new_wire()
        return wire

    def checkpoint(self, server_round: int) -> None:
        self.rounds_done = server_round
        if self.out_dir is not None:
            save_checkpoint(self.out_dir, server_round, {f"server.{k}": v for k, v in self.server.tensors.items()},
                            {"config": self.config.to_dict()})

    def _discover(self, grid: Grid, timeout: float | None = None) -> None:
        SpaFLStrategy._discover(self, grid, self.connect_timeout if timeout is None else timeout)

    def finish(self) -> dict:
        """summary.json (the keys of ``spafl-fl run``) and the plots, in ``out_dir`` if given."""
        summary = summarize(self.records, self.config.algorithm)
        self.finish_summary = summary
        if self.out_dir is not None:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=1))
            from ..plots import plot_runs

            plot_runs([(self.label, self.records)], self.out_dir)
        return summary


def _new_wire() -> dict:
    return {"uplink_wire_bits": 0, "downlink_wire_bits": 0, "client_compute_seconds": 0.0, "client_cpu_seconds": 0.0}


class DeployedSpaFL(RunFolder, SpaFLStrategy):
    """``SpaFLStrategy`` with checkpoints, resume and the wire accounting of the deployment."""

    def __init__(self, config: RunConfig, out_dir: str | None = None, *, resume: bool = False,
                 connect_timeout: float = 300.0, overwrite: bool = False):
        SpaFLStrategy.__init__(self, config, None)
        self.out_dir = out_dir
        self.connect_timeout = connect_timeout
        self.label = f"spafl on flower ({self.backend})"
        self.open_folder(self.description, resume, overwrite)


class FedAvgStrategy(RunFolder, SpaFLStrategy):
    """FedAvg as ``spafl-fl run --algorithm fedavg`` runs it, on Flower: the sampled clients (same
    sampling) get the global state (``ArrayRecord`` "arrays") and the round, train it and send their
    full state back; the server checks and averages the states weighted by samples (``Server``);
    every client then evaluates the new global model on its test split (the evaluation broadcast is
    Flower traffic only: the in-process loop evaluates in place). Node discovery and the checks of
    the replies are SpaFL's (``SpaFLStrategy``)."""

    update_record = ARRAYS

    def __init__(self, config: RunConfig, out_dir: str | None = None, *, resume: bool = False,
                 connect_timeout: float = 300.0, overwrite: bool = False):
        if config.algorithm != "fedavg":
            raise ValueError(f"FedAvgStrategy runs FedAvg; got algorithm={config.algorithm!r}")
        self.config, self.out_dir, self.connect_timeout = config, out_dir, connect_timeout
        setup = prepare_run(config, torch.device(config.device))
        self.backend = None
        state = {k: v.detach().clone() for k, v in setup.init.state_dict().items()}
        self.server = Server(state, config.clients, config.sample, config.seed, "samples")
        self.dense_state_bits = tensor_bits(dense_state(setup.init))
        self.density_keys = ()  # a dense model: evaluate replies carry no densities
        self.description = describe_run(config, None, setup.client_data, 0, self.dense_state_bits)
        self.records: list[dict] = []
        self.nodes: dict[int, int] = {}
        self.label = "fedavg on flower"
        self._round: _Round | None = None
        self.finish_summary: dict | None = None
        self.open_folder(self.description, resume, overwrite)

    def summary(self) -> None:
        log.info("FedAvgStrategy: %d clients, %d sampled per round", self.config.clients, self.config.sample)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self._discover(grid)
        r = server_round - 1
        self._round = _Round(time.perf_counter(), self.server.sample_clients(r))
        messages = []
        for k in self._round.sampled:
            record = to_array_record(self.server.tensors)
            self._round.downlink_bits += 8 * payload_bytes(record)
            messages.append(Message(RecordDict({ARRAYS: record, CONFIG: ConfigRecord({"round": r})}),
                                    dst_node_id=self.nodes[k], message_type="train", group_id=str(server_round)))
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return [Message(RecordDict({ARRAYS: to_array_record(self.server.tensors)}), dst_node_id=self.nodes[k],
                        message_type="evaluate", group_id=str(server_round)) for k in range(self.config.clients)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the clients' accuracy and loss of the global model; write the round's record."""
        state = self._round
        evaluations = self.evaluations(server_round, replies)
        answered = len(evaluations) + len(state.rejected_evaluations)
        if answered != self.config.clients:
            log.warning("round %d: clients %s did not evaluate; averaging over the others", server_round - 1,
                        sorted(set(range(self.config.clients)) - set(evaluations)
                               - {k for k, _ in state.rejected_evaluations}))
        ordered = [evaluations[k] for k in sorted(evaluations)]
        accuracy, loss, dens = average_evaluation([a for a, _, _ in ordered], [v for _, v, _ in ordered], [])
        updates = state.updates
        flops = sum((u.flops for u in updates), LayerFlops())
        hp = self.config.local_training(server_round - 1)
        record = {
            "round": server_round, "sampled": state.sampled, "lr": hp.lr, "th_coeff": hp.th_coeff,
            "accuracy": accuracy, "loss": loss,
            "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else float("nan"),
            "density": dens, "uplink_bits": state.uplink_bits, "downlink_bits": state.downlink_bits,
            "dense_uplink_bits": self.dense_state_bits * len(state.sampled),
            "train_flops": flops.train, "dense_train_flops": flops.dense_train,
            "paper_train_flops": flops.paper_train, "train_seconds": sum(u.train_seconds for u in updates),
            "baseline_train_seconds": None,
            "rejected": [{"client": k, "reason": reason} for k, reason in state.rejected],
            "uplink_bytes_per_client": {str(k): v for k, v in sorted(state.uplink_bytes_per_client.items())},
            **self.round_extras(server_round),
        }
        self.write_record(record, state)
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def make_strategy(config: RunConfig, out_dir: str | None = None, *, resume: bool = False,
                  connect_timeout: float = 300.0, overwrite: bool = False) -> DeployedSpaFL | FedAvgStrategy:
    """The strategy of ``config.algorithm`` (SpaFL or FedAvg; the deployment does not run Local)."""
    if config.algorithm not in DEPLOYED_ALGORITHMS:
        raise ValueError(f"the deployment runs {' and '.join(DEPLOYED_ALGORITHMS)}; got algorithm={config.algorithm!r}")
    cls = DeployedSpaFL if config.algorithm == "spafl" else FedAvgStrategy
    return cls(config, out_dir, resume=resume, connect_timeout=connect_timeout, overwrite=overwrite)


def _account(strategy: RunFolder, sent: list[Message], replies: list[Message]) -> None:
    wire = strategy.wire
    wire["downlink_wire_bits"] += 8 * sum(message_bytes(m) for m in sent)
    for reply in replies:
        wire["uplink_wire_bits"] += 8 * message_bytes(reply)
        measured = wire_metrics(reply)
        if measured:
            wire["client_compute_seconds"] += float(measured.get("compute-seconds", 0.0))
            wire["client_cpu_seconds"] += float(measured.get("cpu-seconds", 0.0))


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.5,
             check_nodes: float = 2.0) -> list[Message]:
    """``grid.send_and_receive`` that stops waiting sooner: it polls every ``poll`` seconds (Flower's
    waits 3 s between polls, a long time next to a small model's round) and gives up on a node as soon
    as the SuperLink no longer lists it (a SuperNode that left or missed its heartbeats), checked every
    ``check_nodes`` seconds; at most ``timeout`` seconds in all."""
    try:
        pushed = list(grid.push_messages(messages))  # in the order of messages; None: not accepted
    except NotImplementedError:  # a Grid that only sends and receives (tests' in-process one)
        return list(grid.send_and_receive(messages, timeout=timeout))
    destination = {mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages) if mid is not None}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + check_nodes
    while destination and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(destination)):
            replies.append(reply)
            destination.pop(reply.metadata.reply_to_message_id, None)
        if destination and time.monotonic() >= next_check:
            next_check = time.monotonic() + check_nodes
            online = set(grid.get_node_ids())
            for message_id, node in list(destination.items()):
                if node not in online:
                    log.warning("node %d left the federation; not waiting for its reply", node)
                    del destination[message_id]
        if destination:
            time.sleep(poll)
    return replies


def drive(strategy: DeployedSpaFL | FedAvgStrategy, grid: Grid, timeout: float = 600.0) -> dict:
    """Run the rounds after ``strategy.rounds_done`` up to ``config.rounds`` on ``grid`` (each exchange
    waits at most ``timeout`` seconds; a node that does not answer in time counts as failed),
    checkpointing after each; write the summary. A resumed run marks its messages (``persist.DEPLOY``)
    so that nodes reload their client state."""
    arrays = strategy.initial_arrays()
    resumed_after = strategy.rounds_done
    for server_round in range(strategy.rounds_done + 1, strategy.config.rounds + 1):
        for phase in ("train", "evaluate"):
            configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
            messages = list(configure(server_round, arrays, ConfigRecord(), grid))
            if resumed_after:
                for message in messages:
                    message.content[DEPLOY] = ConfigRecord({"resume-round": resumed_after})
            replies = exchange(grid, messages, timeout)
            _account(strategy, messages, replies)
            if phase == "train":
                arrays, _ = strategy.aggregate_train(server_round, replies)
            else:
                strategy.aggregate_evaluate(server_round, replies)
        strategy.checkpoint(server_round)
    return strategy.finish()

