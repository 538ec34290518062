"""SpaFL on Flower (``flwr``, Message API): a ``ClientApp`` factory, a strategy and a ``ServerApp``.

The algorithm is the one ``spafl-fl run`` runs (``Simulation``), on the same building blocks: the
client side is a ``SpaFLClient`` (training, update, ``receive_global``, evaluation), the server side a
``Server`` (sampling by (seed, round), update checks, uniform threshold average). Flower only carries
the messages. A round, as ``Strategy.start`` drives it:

- ``train`` to the sampled clients: a ``ConfigRecord`` (round, which global broadcast the client must
  hold, whether to time the masked-dense replay) and, with the lazy global update (the default), the
  current global thresholds (``ArrayRecord`` "thresholds"): the client applies the paper's threshold
  update with the global change since it last trained, then trains. It replies with its thresholds
  only (``ArrayRecord`` "thresholds") and a ``MetricRecord`` (samples, loss, seconds, FLOPs).
- ``evaluate`` to every client: with the eager update, the new global thresholds (``ArrayRecord``
  "thresholds"), from which the client derives the global difference to the previous broadcast and
  applies the threshold update; with the lazy one, no arrays. The client replies with accuracy, loss
  and density (``MetricRecord``).

The Local baseline (``algorithm="local"``) runs on the same apps: each node trains its own dense model,
and no message carries arrays.

Which node is which client: a ``query`` message at the start asks every node for its
``partition-id``, so the clients a round samples, their data and batch orders match ``spafl-fl run``.
A client's model lives in its node's ``Context.state`` between rounds (its weights are personal and
never leave the node).

Arrays travel as raw little-endian bytes (``stype`` "raw") rather than Flower's default ``.npy``
serialisation, so the bytes a message carries per threshold array are exactly ``numel * itemsize``:
the bits on the wire reported here are the lengths of the ``Array.data`` Flower sent.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Flower and Ray report usage to their servers unless told not to; read when they are imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from spafl_kernels import density, thresholds  # noqa: E402
from spafl_kernels.flops import FLOP_FIELDS, LayerFlops  # noqa: E402

from .accounting import dense_state, tensor_bits, threshold_count  # noqa: E402
from .checkpoint import append_line, atomic_write_text  # noqa: E402
from .client import ClientUpdate, LocalClient, LocalTraining, SpaFLClient, has_batchnorm, make_batches  # noqa: E402
from .config import RunConfig, run_only_problems  # noqa: E402
from .rundir import claim_out_dir, ours  # noqa: E402
from .server import Server  # noqa: E402
from .simulation import (  # noqa: E402
    RunSetup,
    average_evaluation,
    batch_seed,
    describe_run,
    prepare_run,
    round_record,
    summarize,
)
from .userspec import cwd_on_path  # noqa: E402

log = logging.getLogger("spafl_fl")

RAW = "raw"
"""``Array.stype`` of a C-contiguous little-endian buffer: ``data`` holds the elements and nothing else."""

THRESHOLDS = "thresholds"
METRICS = "metrics"
CONFIG = "config"
FAILURE = "failure"  # a train reply's ConfigRecord {"reason": ...} when local training diverged
FLOWER_ALGORITHMS = ("spafl", "local")
"""What the apps run: SpaFL, and the Local baseline (own dense models, messages without arrays)."""


# -- tensors <-> records ---------------------------------------------------------------------------

def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ``ArrayRecord`` of raw little-endian buffers (no header, no pickle)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        array = tensor.detach().cpu().numpy()
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        record[name] = Array(dtype=array.dtype.name, shape=tuple(array.shape), stype=RAW, data=array.tobytes())
    return record


class ReplyError(ValueError):
    """A message whose content cannot be used (a malformed array or metric); the text says which and why."""


ARRAY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
"""The element types an ``Array`` may declare (what models and their buffers hold)."""


def _decode_array(name: str, array) -> torch.Tensor:
    if not isinstance(array, Array):
        raise ReplyError(f"array {name!r} is a {type(array).__name__}, not an Array")
    if array.stype != RAW:
        raise ReplyError(f"array {name!r} is encoded as {array.stype!r}; only {RAW!r} buffers are read")
    if not isinstance(array.dtype, str) or array.dtype not in ARRAY_DTYPES:
        raise ReplyError(f"array {name!r} has dtype {array.dtype!r}; expected one of {', '.join(ARRAY_DTYPES)}")
    shape = array.shape
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape):
        raise ReplyError(f"array {name!r} has shape {shape!r}; expected non-negative integers")
    dtype = np.dtype(array.dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not isinstance(array.data, bytes) or len(array.data) != expected:
        got = len(array.data) if isinstance(array.data, bytes) else type(array.data).__name__
        raise ReplyError(f"array {name!r} holds {got} bytes; shape {tuple(shape)} of {array.dtype} needs {expected}")
    values = np.frombuffer(array.data, dtype=dtype).reshape(tuple(shape))
    return torch.from_numpy(values.astype(values.dtype.newbyteorder("="), copy=True))


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of ``to_array_record``; ``ReplyError`` (naming the array) for anything else: another
    encoding, an unknown dtype, a shape that disagrees with the data."""
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"expected an ArrayRecord, got a {type(record).__name__}")
    return {name: _decode_array(name, array) for name, array in record.items()}


def _metric(metrics: MetricRecord, key: str, *, low: float | None = 0.0, high: float | None = None,
            default=None, finite: bool = True, integer: bool = False):
    """``metrics[key]`` checked: a number (an int with ``integer``), finite unless ``finite`` is False, in
    ``[low, high]``; ``default`` when absent (``ReplyError`` when absent and ``default`` is None)."""
    if key not in metrics:
        if default is None:
            raise ReplyError(f"metric {key!r} is missing")
        return default
    value = metrics[key]
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ReplyError(f"metric {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (finite and not math.isfinite(value)) or (low is not None and not value >= low) or (
            high is not None and not value <= high):
        bounds = f" in [{low}, {high if high is not None else 'inf'})" if low is not None else ""
        raise ReplyError(f"metric {key!r} must be a{' finite' if finite else ''} number{bounds}, got {value!r}")
    return value


def decode_train_reply(reply: Message, client: int, update_record: str) -> ClientUpdate:
    """The ``ClientUpdate`` a train reply carries, every field a client controls checked; ``ReplyError``
    saying why when it is malformed. A reply with a failure record is a failed update whatever its reason."""
    content = reply.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r}")
    failure = None
    if FAILURE in content:
        reason = content.config_records.get(FAILURE, ConfigRecord()).get("reason")
        failure = reason.strip() if isinstance(reason, str) and reason.strip() else (
            f"the client reported a failure without a readable reason ({reason!r})")
    tensors = from_array_record(content.array_records.get(update_record, ArrayRecord()))
    flops = LayerFlops(**{name: _metric(metrics, f"flops.{name}", default=0) for name in FLOP_FIELDS})
    baseline = _metric(metrics, "baseline-seconds") if "baseline-seconds" in metrics else None
    return ClientUpdate(
        client, tensors, _metric(metrics, "num-examples", low=1, integer=True),
        float(_metric(metrics, "train-loss", low=None, finite=False)), float(_metric(metrics, "train-seconds")),
        None if baseline is None else float(baseline), flops, failure=failure,
        authors_flops=float(_metric(metrics, "authors-flops", default=0.0)))


def decode_evaluate_reply(reply: Message, density_keys: tuple[str, ...]) -> tuple[float, float, dict[str, float]]:
    """``(accuracy %, loss, density per layer)`` of an evaluate reply, checked: accuracy in [0, 100], a
    finite loss >= 0, and ``density.<name>`` in [0, 1] for exactly the names ``density_keys`` (none for
    a dense model); ``ReplyError`` saying why otherwise."""
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is None:
        raise ReplyError(f"no MetricRecord {METRICS!r}")
    accuracy = float(_metric(metrics, "accuracy", high=100.0))
    loss = float(_metric(metrics, "loss"))
    sent = {key[len("density."):] for key in metrics if key.startswith("density.")}
    if sent != set(density_keys):
        raise ReplyError(f"density keys {sorted(sent)}, expected {sorted(density_keys)}")
    dens = {name: float(_metric(metrics, f"density.{name}", high=1.0)) for name in density_keys}
    return accuracy, loss, dens


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record carries (``sum len(Array.data)``; names and shapes not counted)."""
    return sum(len(array.data) for array in record.values())


# -- client side -----------------------------------------------------------------------------------

_SETUPS: dict[str, RunSetup] = {}


def _setup(config: RunConfig) -> RunSetup:
    """The run's data and initial model, built once per process (a Ray actor serves many nodes)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _SETUPS:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        _SETUPS[key] = prepare_run(config, torch.device(config.device))
    return _SETUPS[key]


def _load_client(config: RunConfig, context: Context) -> tuple[SpaFLClient | LocalClient, int]:
    """This node's ``SpaFLClient`` as the last message left it (``Context.state``), or fresh from the
    run's initial model; and the number of global broadcasts it has received."""
    setup = _setup(config)
    cid = int(context.node_config["partition-id"])
    model = copy.deepcopy(setup.init)
    client = (LocalClient if config.algorithm == "local" else SpaFLClient)(cid, model, setup.client_data[cid])
    received = 0
    if "model" in context.state:
        model.load_state_dict(from_array_record(context.state["model"]))
        client.global_thresholds = from_array_record(context.state["global"])
        received = int(context.state["client"]["received"])
    return client, received


def _save_client(client: SpaFLClient, received: int, context: Context) -> None:
    context.state["model"] = to_array_record(client.model.state_dict())
    context.state["global"] = to_array_record(getattr(client, "global_thresholds", {}))  # none for Local
    context.state["client"] = ConfigRecord({"received": received})


def round_batches(config: RunConfig, r: int, cid: int) -> tuple[LocalTraining, list[torch.Tensor]]:
    """Client ``cid``'s hyperparameters and batches of round ``r``, as ``spafl-fl run`` draws them."""
    setup = _setup(config)
    hp = config.local_training(r)
    gen = torch.Generator().manual_seed(batch_seed(config.seed, r, cid))
    return hp, make_batches(setup.client_data[cid].num_train, hp.epochs, hp.batch_size, gen,
                            drop_single=has_batchnorm(setup.init))


def identify(message: Message, context: Context) -> Message:
    """A ``query`` handler: tell the server which client (data partition) this node is."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": pid})}), reply_to=message)


def client_app(config: RunConfig) -> ClientApp:
    """A ``ClientApp`` running SpaFL clients of ``config``; node ``partition-id`` k is client k."""
    if config.algorithm not in FLOWER_ALGORITHMS:
        raise ValueError(f"the Flower apps run {FLOWER_ALGORITHMS}; got algorithm={config.algorithm!r}")
    app = ClientApp()
    app.query()(identify)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """Train on this round's batches; reply with the thresholds and the round's bookkeeping."""
        cfg = message.content[CONFIG]
        r = int(cfg["round"])
        client, received = _load_client(config, context)
        if THRESHOLDS in message.content.array_records:
            # Lazy update: the global change since this client last trained, applied before training.
            client.receive_global(from_array_record(message.content[THRESHOLDS]))
        elif config.algorithm == "spafl" and received != int(cfg["received"]):
            # Training on stale global thresholds would corrupt the average: refuse instead.
            raise RuntimeError(f"client {client.cid} holds {received} global broadcasts, the server sent "
                               f"{int(cfg['received'])}")
        setup = _setup(config)
        hp, batches = round_batches(config, r, client.cid)
        if config.algorithm == "local":
            update = client.fit(hp, batches, plan=setup.plan)
        else:
            update = client.fit(hp, batches, plan=setup.plan, measure_baseline=bool(cfg["measure-baseline"]),
                                baseline_first=bool(cfg["baseline-first"]))
        _save_client(client, received, context)
        metrics = {"num-examples": update.num_samples, "train-loss": update.train_loss,
                   "train-seconds": update.train_seconds, "authors-flops": update.authors_flops,
                   **{f"flops.{name}": getattr(update.flops, name) for name in FLOP_FIELDS}}
        if update.baseline_seconds is not None:
            metrics["baseline-seconds"] = update.baseline_seconds
        content = {THRESHOLDS: to_array_record(update.tensors), METRICS: MetricRecord(metrics)}
        if update.failure:
            content[FAILURE] = ConfigRecord({"reason": update.failure})
        return Message(RecordDict(content), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """Apply the global broadcast (threshold update with the difference), then test the own model."""
        client, received = _load_client(config, context)
        if THRESHOLDS in message.content.array_records:  # eager update: every client, every round
            client.receive_global(from_array_record(message.content[THRESHOLDS]))
            received += 1
        accuracy, loss = client.evaluate()
        dens = density(client.model)
        _save_client(client, received, context)
        metrics = {"num-examples": int(client.data.y_test.shape[0]), "accuracy": accuracy, "loss": loss,
                   **{f"density.{name}": value for name, value in dens.items()}}
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)

    return app


# -- server side -----------------------------------------------------------------------------------

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
    uplink_bytes_per_client: dict[int, int] = field(default_factory=dict)


class SpaFLStrategy(Strategy):
    """SpaFL's server as a Flower strategy: samples like ``Server.sample_clients``, aggregates with
    ``Server.aggregate``, sends the global thresholds to the sampled clients as they start training
    (lazy update) or to every client after aggregation (eager), and keeps the same
    per-round records as ``Simulation`` (metrics.jsonl, summary.json) in ``out_dir`` if given.

    Bits on the wire are the array bytes of the messages built here (downlink) and of the replies
    received (uplink), times 8.
    """

    update_record = THRESHOLDS
    """The reply record that holds a client's update."""

    def __init__(self, config: RunConfig, out_dir: str | None = None):
        if config.algorithm not in FLOWER_ALGORITHMS:
            raise ValueError(f"the Flower apps run {FLOWER_ALGORITHMS}; got algorithm={config.algorithm!r}")
        if run_only_problems(config.to_dict()):
            raise ValueError("; ".join(run_only_problems(config.to_dict())))
        self.config = config
        self.out_dir = out_dir
        self.sends = config.algorithm == "spafl"  # Local: no thresholds, nothing goes down
        self.lazy = config.global_update == "lazy"
        setup = prepare_run(config, torch.device(config.device))
        self.backend = setup.backend
        self.server = Server(thresholds(setup.init), config.clients, config.sample, config.seed, "uniform")
        self.density_keys = tuple(density(setup.init))  # what every evaluate reply reports
        self.dense_state_bits = tensor_bits(dense_state(setup.init))
        self.description = describe_run(config, setup.backend, setup.client_data, threshold_count(setup.init),
                                        self.dense_state_bits)
        self.records: list[dict] = []
        self.nodes: dict[int, int] = {}  # client (partition-id) -> node id
        self._round: _Round | None = None
        self.finish_summary: dict | None = None  # summary.json, once finish() ran
        if out_dir is not None:
            # New or empty (run.log aside: the caller may log there); it does not resume.
            claim_out_dir(out_dir, resumable=False, ignore=("run.log",), outputs=lambda name: ours(name)
                          and name != "run.log")
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_text(os.path.join(out_dir, "config.json"),
                              json.dumps({**self.description, "engine": "flower"}, indent=1))

    def initial_arrays(self) -> ArrayRecord:
        return to_array_record(self.server.tensors)

    def summary(self) -> None:
        log.info("SpaFLStrategy: %d clients, %d sampled per round, thresholds only on the wire",
                 self.config.clients, self.config.sample)

    def _discover(self, grid: Grid, timeout: float = 600.0) -> None:
        """Map partition ids to node ids by asking every node (once)."""
        # Nodes connect on their own schedule: wait for all of them, as Flower's strategies do.
        deadline = time.monotonic() + timeout
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < self.config.clients and time.monotonic() < deadline:
            time.sleep(0.2)
            node_ids = list(grid.get_node_ids())
        if len(node_ids) != self.config.clients:
            raise RuntimeError(f"the run has {self.config.clients} clients but the grid {len(node_ids)} nodes")
        queries = [Message(RecordDict(), dst_node_id=nid, message_type="query") for nid in node_ids]
        for reply in grid.send_and_receive(queries, timeout=timeout):
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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Round ``server_round`` (1-based): a train instruction to each sampled client. Lazy update: with
        the current global thresholds (the only downlink of the round). Eager: no arrays, every client
        already holds the global thresholds from the last evaluate broadcast."""
        if not self.nodes:
            self._discover(grid)
        r = server_round - 1
        sampled = self.server.sample_clients(r)
        self._round = _Round(time.perf_counter(), sampled)
        # With reference chosen, the replay would time the same thing twice.
        measure = self.config.measure_baseline and self.backend != "reference"
        messages = []
        for j, k in enumerate(sampled):
            cfg = ConfigRecord({"round": r, "received": r, "measure-baseline": measure,
                                "baseline-first": (r + j) % 2 == 1})
            content = RecordDict({CONFIG: cfg})
            if self.sends and self.lazy:
                content[THRESHOLDS] = to_array_record(self.server.tensors)
                self._round.downlink_bits += 8 * payload_bytes(content[THRESHOLDS])
            messages.append(Message(content, dst_node_id=self.nodes[k], message_type="train",
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and average the thresholds the clients sent (``Server.aggregate``)."""
        state = self._round
        client_of = {node: k for k, node in self.nodes.items()}
        answered = set()
        for reply in replies:
            k = client_of.get(reply.metadata.src_node_id)
            if k is None:
                continue
            answered.add(k)
            if reply.has_error():
                state.rejected.append((k, f"error reply: {reply.error.reason}"))
                log.warning("round %d: client %d failed: %s", server_round - 1, k, reply.error.reason)
                continue
            record = reply.content.array_records.get(self.update_record, ArrayRecord())
            sent = payload_bytes(record)
            state.uplink_bits += 8 * sent
            state.uplink_bytes_per_client[k] = sent
            try:
                state.updates.append(decode_train_reply(reply, k, self.update_record))
            except ReplyError as error:
                state.rejected.append((k, f"malformed reply: {error}"))
                log.warning("round %d: rejected the reply of client %d: %s", server_round - 1, k, error)
        for k in sorted(set(state.sampled) - answered):
            state.rejected.append((k, "no reply"))
        # Server.aggregate sums in list order: sort as the in-process loop does.
        state.updates.sort(key=lambda u: u.client)
        result = self.server.aggregate(state.updates, round_index=server_round - 1)
        state.rejected.extend(result.rejected)
        metrics = MetricRecord({"accepted": len(result.accepted), "uplink-bits": state.uplink_bits})
        return to_array_record(result.tensors), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate instruction to every client; eager update: with the new global thresholds (they
        apply the update, then evaluate)."""
        messages = []
        for k in range(self.config.clients):
            content = RecordDict()
            if self.sends and not self.lazy:
                content[THRESHOLDS] = to_array_record(self.server.tensors)
                self._round.downlink_bits += 8 * payload_bytes(content[THRESHOLDS])
            messages.append(Message(content, dst_node_id=self.nodes[k], message_type="evaluate",
                                    group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the clients' accuracy, loss and density; write the round's record."""
        state = self._round
        evaluations = self.evaluations(server_round, replies)
        if len(evaluations) + len(state.rejected_evaluations) != self.config.clients:
            # Eager: a client that missed the broadcast no longer holds the global thresholds. Either way
            # the round's accuracy would average over fewer clients: the run cannot go on as configured.
            missing = sorted(set(range(self.config.clients)) - set(evaluations)
                             - {k for k, _ in state.rejected_evaluations})
            what = "apply the global thresholds" if self.config.global_update == "eager" else "evaluate (lost?)"
            raise RuntimeError(f"round {server_round - 1}: clients {missing} did not {what}")
        ordered = [evaluations[k] for k in sorted(evaluations)]
        accuracy, loss, dens = average_evaluation([a for a, _, _ in ordered], [v for _, v, _ in ordered],
                                                  [d for _, _, d in ordered])
        record = round_record(server_round, state.sampled, self.config.local_training(server_round - 1),
                              (accuracy, loss, dens), state.updates, state.rejected, self.config.clients,
                              uplink_bits=state.uplink_bits, downlink_bits=state.downlink_bits,
                              dense_uplink_bits=self.dense_state_bits * len(state.sampled))
        record["uplink_bytes_per_client"] = {str(k): v for k, v in sorted(state.uplink_bytes_per_client.items())}
        record.update(self.round_extras(server_round))
        self.write_record(record, state)
        return MetricRecord({"accuracy": accuracy, "loss": loss, "density": dens["total"]})

    def evaluations(self, server_round: int, replies: Iterable[Message]) -> dict[int, tuple[float, float, dict]]:
        """client -> (accuracy, loss, density) of the evaluate replies that decode; a malformed one is
        logged and kept in the round's ``rejected_evaluations``, an error reply only logged."""
        state = self._round
        client_of = {node: k for k, node in self.nodes.items()}
        evaluations = {}
        for reply in replies:
            k = client_of.get(reply.metadata.src_node_id)
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
        if not evaluations:
            raise RuntimeError(f"round {server_round - 1}: no client's evaluation could be used (see the log)")
        return evaluations

    def write_record(self, record: dict, state: _Round) -> None:
        """Finish the round's record (rejected evaluations, wall time), keep it and append it to metrics.jsonl."""
        if state.rejected_evaluations:
            record["rejected_evaluations"] = [{"client": k, "reason": why} for k, why in state.rejected_evaluations]
        record["wall_seconds"] = time.perf_counter() - state.started
        self.records.append(record)
        if self.out_dir is not None:
            append_line(os.path.join(self.out_dir, "metrics.jsonl"), json.dumps(record))

    def round_extras(self, server_round: int) -> dict:
        """More fields for round ``server_round``'s record (a subclass's accounting); none here."""
        return {}

    def finish(self) -> dict:
        """summary.json (same keys as ``spafl-fl run``) and the plots, in ``out_dir`` if given."""
        summary = summarize(self.records, self.config.algorithm)
        self.finish_summary = summary
        if self.out_dir is not None:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=1))
            from .plots import plot_runs

            plot_runs([(f"{self.config.algorithm} on flower ({self.backend or 'dense'})", self.records)], self.out_dir)
        return summary


def server_app(strategy: SpaFLStrategy, timeout: float = 3600.0) -> ServerApp:
    """A ``ServerApp`` that runs ``strategy`` for its config's rounds and writes the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, strategy.initial_arrays(), num_rounds=strategy.config.rounds, timeout=timeout)
        strategy.finish()

    return app


def run_flower_simulation(config: RunConfig, out_dir: str | None = None, *, num_cpus: int | None = None,
                          client_cpus: float = 1.0, object_store_mb: int = 128) -> SpaFLStrategy:
    """Run ``config`` on Flower's simulation engine (Ray) in this machine: ``config.clients`` virtual
    SuperNodes. Ray gets ``num_cpus`` (default: all), a small object store, no dashboard; every client
    app asks for ``client_cpus``. Returns the strategy (its ``records``; summary in ``out_dir``)."""
    from flwr.simulation import run_simulation

    strategy = SpaFLStrategy(config, out_dir)
    cwd_on_path()  # Flower hands this sys.path to its Ray workers: a MODULE:CALLABLE from here imports there
    init_args = {"num_cpus": num_cpus or os.cpu_count() or 1, "object_store_memory": object_store_mb * 2**20,
                 "include_dashboard": False, "configure_logging": False}
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=server_app(strategy), client_app=client_app(config), num_supernodes=config.clients,
                   backend_config=backend_config)
    if len(strategy.records) != config.rounds:
        raise RuntimeError(f"the Flower run stopped after {len(strategy.records)} of {config.rounds} rounds "
                           "(see the log above)")
    return strategy
