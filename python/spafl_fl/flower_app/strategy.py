"""The app's server side: one strategy for every registered algorithm (``RunStrategy``), driven round by
round by ``drive`` against a Flower ``Grid`` (the simulation engine's or the deployment's).

A round: a train instruction to each sampled client (``Server.sample_clients``), carrying what the algorithm
sends down with it (``Algorithm.train_payload``) and the run's kernel path choices; the replies checked and
averaged (``Server.aggregate``); an evaluate instruction to every client, carrying a broadcast or the global
model (``Algorithm.evaluate_payload``); the evaluations averaged into the round's record (``core.round_record``),
written with a checkpoint by the run recorder (``recorder.RunRecorder``).

Records keep the keys of ``spafl-fl run``: ``uplink_bits`` / ``downlink_bits`` are the array payloads the
algorithm needs, exactly as the in-process loop counts them. Beside them, what Flower carried:
``uplink_wire_bits`` / ``downlink_wire_bits`` (every message of the round, its records' bytes as Flower's
``count_bytes`` gives them: ``mods.message_bytes``) and ``client_compute_seconds`` / ``client_cpu_seconds`` (the
clients' handler time from ``wire_mod``), apart from the round's ``wall_seconds``, which also holds the network,
the SuperLink's queues and the start of each ClientApp process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from spafl_kernels import density
from spafl_kernels.paths import export_table, import_table

from ..accounting import dense_state, tensor_bits, threshold_count
from ..algorithms import algorithm
from ..client import ClientUpdate
from ..config import RunConfig, run_only_problems
from ..core import WIRE_KEYS, average_evaluation, describe_run, prepare_run, round_record
from ..recorder import Recorded, RunRecorder
from ..rundir import DEPLOYMENT_FOLDER, deployment_output
from ..server import Server
from .messages import (
    CONFIG,
    GLOBAL,
    KERNEL_PATHS,
    METRICS,
    UPDATE,
    ReplyError,
    _metric,
    decode_evaluate_reply,
    decode_train_reply,
    payload_bytes,
    to_array_record,
)
from .mods import message_bytes, wire_metrics
from .persist import DEPLOY

log = logging.getLogger("spafl_fl")

ENGINE = "flower"


@dataclass
class _Round:
    """A round's bookkeeping between ``configure_train`` and ``aggregate_evaluate``."""

    started: float
    sampled: list[int]
    updates: list[ClientUpdate] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    rejected_evaluations: list[tuple[int, str]] = field(default_factory=list)
    uplink_bits: int = 0
    downlink_bits: int = 0
    wire: dict = field(default_factory=lambda: {key: 0 for key in WIRE_KEYS})


class RunStrategy(Recorded):
    """The server of a run of ``config`` on Flower, for every registered algorithm; with ``out_dir``, the files
    of ``spafl-fl run`` and a checkpoint per round there (``resume``: continue the run there; ``overwrite``:
    replace what a previous run wrote). ``engine`` is written into config.json."""

    def __init__(self, config: RunConfig, out_dir: str | None = None, *, resume: bool = False,
                 overwrite: bool = False, connect_timeout: float = 300.0, engine: str = ENGINE):
        problems = run_only_problems(config.to_dict())
        if problems:
            raise ValueError("; ".join(problems))
        self.config, self.out_dir, self.connect_timeout = config, out_dir, connect_timeout
        self.algorithm = algorithm(config.algorithm)
        self.recorder = RunRecorder(config, out_dir, resume=resume, overwrite=overwrite, outputs=deployment_output,
                                    ignore=(DEPLOYMENT_FOLDER,), engine=engine,
                                    what="what a previous run wrote (resume = true continues it)")
        setup = prepare_run(config, torch.device(config.device))
        self.backend = setup.backend
        self.server = Server(self.algorithm.server_tensors(setup.init), config.clients, config.sample, config.seed,
                             self.algorithm.weighting)
        self.density_keys = tuple(density(setup.init)) if self.algorithm.sparse else ()
        self.dense_state_bits = tensor_bits(dense_state(setup.init))
        self.description = describe_run(config, setup.backend, setup.client_data, threshold_count(setup.init),
                                        self.dense_state_bits)
        self.nodes: dict[int, int] = {}  # client (partition-id) -> node id
        self._round: _Round | None = None
        self.finish_summary: dict | None = None
        self.resumed_after = 0
        if self.recorder.resuming:
            tensors = self.recorder.resume(self.state_tensors())
            self.server.tensors = {k[len("server."):]: v for k, v in tensors.items() if k.startswith("server.")}
            self.resumed_after = self.recorder.rounds_done
        self.recorder.start(self.description)

    @property
    def label(self) -> str:
        return f"{self.config.algorithm} on flower ({self.backend or 'dense'})"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the server's checkpoint holds (the clients' state lives on their nodes)."""
        return {f"server.{name}": t for name, t in self.server.tensors.items()}

    def _discover(self, grid: Grid) -> None:
        """Map partition ids to node ids by asking every node (once)."""
        # Nodes connect on their own schedule: wait for all of them, as Flower's strategies do.
        deadline = time.monotonic() + self.connect_timeout
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < self.config.clients and time.monotonic() < deadline:
            time.sleep(0.2)
            node_ids = list(grid.get_node_ids())
        if len(node_ids) != self.config.clients:
            raise RuntimeError(f"the run has {self.config.clients} clients but the grid {len(node_ids)} nodes")
        queries = [Message(RecordDict(), dst_node_id=nid, message_type="query") for nid in node_ids]
        for reply in grid.send_and_receive(queries, timeout=self.connect_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not say which client it is: "
                                   f"{reply.error.reason}")
            try:
                pid = _metric(reply.content.metric_records[METRICS], "partition-id", integer=True)
            except (KeyError, ReplyError) as error:
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not say which client it is: "
                                   f"{error}") from None
            self.nodes[pid] = reply.metadata.src_node_id
        if sorted(self.nodes) != list(range(self.config.clients)):
            raise RuntimeError(f"nodes answered partition ids {sorted(self.nodes)}, "
                               f"expected 0..{self.config.clients - 1}")

    def _message(self, content: RecordDict, k: int, kind: str, server_round: int) -> Message:
        if self.resumed_after:  # the nodes reload their clients' state saved before
            content[DEPLOY] = ConfigRecord({"resume-round": self.resumed_after})
        return Message(content, dst_node_id=self.nodes[k], message_type=kind, group_id=str(server_round))

    def configure_train(self, server_round: int, grid: Grid) -> list[Message]:
        """Round ``server_round`` (1-based): a train instruction to each sampled client, with what goes down."""
        if not self.nodes:
            self._discover(grid)
        r = server_round - 1
        sampled = self.server.sample_clients(r)
        self._round = _Round(time.perf_counter(), sampled)
        # With reference chosen, the replay would time the same thing twice.
        measure = self.algorithm.timed_replay and self.config.measure_baseline and self.backend != "reference"
        paths = json.dumps(export_table())
        no_difference = {k: torch.zeros_like(v) for k, v in self.server.tensors.items() if v.is_floating_point()}
        messages = []
        for j, k in enumerate(sampled):
            cfg = ConfigRecord({"round": r, "received": r, "measure-baseline": measure,
                                "baseline-first": (r + j) % 2 == 1, KERNEL_PATHS: paths})
            content = RecordDict({CONFIG: cfg})
            payload = self.algorithm.train_payload(self.config, self.server.tensors, no_difference)
            if payload is not None:
                content[GLOBAL] = to_array_record(payload)
                self._round.downlink_bits += 8 * payload_bytes(content[GLOBAL])
            messages.append(self._message(content, k, "train", server_round))
        return messages

    def _client_of(self, reply: Message) -> int | None:
        return {node: k for k, node in self.nodes.items()}.get(reply.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> None:
        """Check and average the updates the clients sent (``Server.aggregate``); take in their path choices."""
        state = self._round
        answered = set()
        for reply in replies:
            k = self._client_of(reply)
            if k is None:
                continue
            answered.add(k)
            if reply.has_error():
                state.rejected.append((k, f"error reply: {reply.error.reason}"))
                log.warning("round %d: client %d failed: %s", server_round - 1, k, reply.error.reason)
                continue
            state.uplink_bits += 8 * payload_bytes(reply.content.array_records.get(UPDATE, ArrayRecord()))
            try:
                state.updates.append(decode_train_reply(reply, k))
                paths = reply.content.config_records.get(CONFIG, ConfigRecord()).get(KERNEL_PATHS)
                if paths is not None:
                    import_table(json.loads(str(paths)))  # the first choice of a signature stays the run's
            except (ReplyError, ValueError) as error:
                state.rejected.append((k, f"malformed reply: {error}"))
                log.warning("round %d: rejected the reply of client %d: %s", server_round - 1, k, error)
        for k in sorted(set(state.sampled) - answered):
            state.rejected.append((k, "no reply"))
        # Server.aggregate sums in list order: sort as the in-process loop does.
        state.updates.sort(key=lambda u: u.client)
        result = self.server.aggregate(state.updates, round_index=server_round - 1)
        state.rejected.extend(result.rejected)

    def configure_evaluate(self, server_round: int, grid: Grid) -> list[Message]:
        """An evaluate instruction to every client, with a broadcast or the global model where the algorithm
        sends one."""
        messages = []
        payload = self.algorithm.evaluate_payload(self.server.tensors, self.config)
        counted = self.algorithm.counts_evaluate_payload(self.config)
        for k in range(self.config.clients):
            content = RecordDict()
            if payload is not None:
                content[GLOBAL] = to_array_record(payload)
                if counted:
                    self._round.downlink_bits += 8 * payload_bytes(content[GLOBAL])
            messages.append(self._message(content, k, "evaluate", server_round))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> dict:
        """Average the clients' accuracy, loss and density; record the round."""
        state = self._round
        evaluations = {}
        for reply in replies:
            k = self._client_of(reply)
            if k is None:
                continue
            if reply.has_error():
                log.warning("round %d: client %d failed to evaluate: %s", server_round - 1, k, reply.error.reason)
                continue
            try:
                evaluations[k] = decode_evaluate_reply(reply, self.density_keys)
            except ReplyError as error:
                state.rejected_evaluations.append((k, f"malformed reply: {error}"))
                log.warning("round %d: rejected the evaluation of client %d: %s", server_round - 1, k, error)
        if len(evaluations) + len(state.rejected_evaluations) != self.config.clients:
            # A client that missed a broadcast no longer holds the global tensors, and the round's accuracy
            # would average over fewer clients: the run cannot go on as configured.
            missing = sorted(set(range(self.config.clients)) - set(evaluations)
                             - {k for k, _ in state.rejected_evaluations})
            raise RuntimeError(f"round {server_round - 1}: clients {missing} did not evaluate (lost?)")
        if not evaluations:
            raise RuntimeError(f"round {server_round - 1}: no client's evaluation could be used (see the log)")
        ordered = [evaluations[k] for k in sorted(evaluations)]
        evaluation = average_evaluation([a for a, _, _ in ordered], [v for _, v, _ in ordered],
                                        [d for _, _, d in ordered if d])
        record = round_record(server_round, state.sampled, self.config.local_training(server_round - 1), evaluation,
                              state.updates, state.rejected, self.config.clients, uplink_bits=state.uplink_bits,
                              downlink_bits=state.downlink_bits,
                              dense_uplink_bits=self.dense_state_bits * len(state.sampled),
                              rejected_evaluations=state.rejected_evaluations, wire=state.wire,
                              wall_seconds=time.perf_counter() - state.started)
        self.recorder.record(record)
        return record

    def account(self, sent: list[Message], replies: list[Message]) -> None:
        """What Flower carried for the round's messages and replies, and the clients' handler time."""
        wire = self._round.wire
        wire["downlink_wire_bits"] += 8 * sum(message_bytes(m) for m in sent)
        for reply in replies:
            wire["uplink_wire_bits"] += 8 * message_bytes(reply)
            measured = wire_metrics(reply)
            if measured:
                wire["client_compute_seconds"] += float(measured.get("compute-seconds", 0.0))
                wire["client_cpu_seconds"] += float(measured.get("cpu-seconds", 0.0))

    def finish(self) -> dict:
        """summary.json (the keys of ``spafl-fl run``) and the plots, in ``out_dir`` if given."""
        self.finish_summary = self.recorder.finish(self.label)
        return self.finish_summary


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



def drive(strategy: RunStrategy, grid: Grid, timeout: float = 600.0) -> dict:
    """Run the rounds after ``strategy.rounds_done`` up to ``config.rounds`` on ``grid`` (each exchange
    waits at most ``timeout`` seconds; a node that does not answer in time counts as failed),
    checkpointing after each; write the summary."""
    for server_round in range(strategy.rounds_done + 1, strategy.config.rounds + 1):
        messages = strategy.configure_train(server_round, grid)
        replies = exchange(grid, messages, timeout)
        strategy.account(messages, replies)
        strategy.aggregate_train(server_round, replies)
        messages = strategy.configure_evaluate(server_round, grid)
        replies = exchange(grid, messages, timeout)
        strategy.account(messages, replies)
        strategy.aggregate_evaluate(server_round, replies)
        strategy.recorder.checkpoint(strategy.state_tensors())
    return strategy.finish()
