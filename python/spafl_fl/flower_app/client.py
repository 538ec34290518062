"""The app's ``ClientApp`` (``spafl_fl.flower_app.client:app``), one for every algorithm and both Flower engines:
one SuperNode is one client.

Node config ``partition-id`` picks the client (its data partition; ``num-partitions`` is informative). A
client's state (``Algorithm.make_client(...).state()``: a SpaFL client's model and held thresholds, a Local
client's model; nothing for FedAvg) lives in the node's ``Context.state`` between messages and, with a state
folder (node config ``state-dir``, else run config ``state-dir``), on the node's disk too, so that a resumed
run continues from it. Each message:

- ``query``: the node says which client it is;
- ``train``: the run's kernel path choices (``ConfigRecord`` "config", ``kernel-paths``) replayed; what came
  down (``ArrayRecord`` "global") received; the round's batches trained; the reply carries the update
  (``ArrayRecord`` "update"), the bookkeeping (``MetricRecord`` "metrics") and the client's choices;
- ``evaluate``: what came down received (a broadcast, or FedAvg's global model); accuracy, loss and, for a
  sparse model, density per layer.

Every reply passes through ``wire_mod`` (message sizes, handler time).
"""

from __future__ import annotations

import copy
import json

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from spafl_kernels.flops import FLOP_FIELDS
from spafl_kernels.paths import export_table, import_table

from ..algorithms import algorithm
from ..config import RunConfig
from ..core import RunSetup, prepare_run, round_batches
from . import from_run_config
from .messages import CONFIG, FAILURE, GLOBAL, KERNEL_PATHS, METRICS, UPDATE, from_array_record, to_array_record
from .mods import wire_mod
from .persist import COUNTERS, STATE, persisted

_SETUPS: dict[str, tuple[RunSetup, torch.nn.Module]] = {}


def _setup(config: RunConfig) -> tuple[RunSetup, torch.nn.Module]:
    """The run's data and initial model, and a scratch model for clients without one of their own; built
    once per process (a Ray actor serves many nodes)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _SETUPS:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        setup = prepare_run(config, torch.device(config.device))
        _SETUPS[key] = setup, copy.deepcopy(setup.init)
    return _SETUPS[key]


def load_client(config: RunConfig, context: Context):
    """This node's client as its last message left it (``Context.state``), or fresh from the run's initial
    model; and the number of broadcasts it has received."""
    alg = algorithm(config.algorithm)
    setup, scratch = _setup(config)
    cid = int(context.node_config["partition-id"])
    client = alg.make_client(cid, copy.deepcopy(setup.init) if alg.personal else scratch, setup.client_data[cid],
                             config)
    received = 0
    if STATE in context.state.array_records:
        client.load_state(from_array_record(context.state[STATE]), config.local_training(0))
        received = int(context.state.config_records[COUNTERS]["received"])
    return client, received


def save_client(client, received: int, context: Context) -> None:
    context.state[STATE] = to_array_record(client.state())
    context.state[COUNTERS] = ConfigRecord({"received": received})


def identify(message: Message, context: Context) -> Message:
    """A ``query`` handler: tell the server which client (data partition) this node is."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": pid})}), reply_to=message)


def train(config: RunConfig, message: Message, context: Context) -> Message:
    """Train on this round's batches; reply with the update and the round's bookkeeping."""
    alg = algorithm(config.algorithm)
    cfg = message.content[CONFIG]
    r = int(cfg["round"])
    import_table(json.loads(str(cfg[KERNEL_PATHS])), replace=True)  # the run's choices: every process the same
    client, received = load_client(config, context)
    if GLOBAL in message.content.array_records:
        client.receive(from_array_record(message.content[GLOBAL]))
    elif alg.counts_evaluate_payload(config) and received != int(cfg["received"]):
        # Training on stale global tensors would corrupt the average: refuse instead.
        raise RuntimeError(f"client {client.cid} holds {received} global broadcasts, the server sent "
                           f"{int(cfg['received'])}")
    setup, _ = _setup(config)
    update = client.fit(config.local_training(r), round_batches(config, setup, r, client.cid), plan=setup.plan,
                        measure_baseline=bool(cfg["measure-baseline"]), baseline_first=bool(cfg["baseline-first"]))
    save_client(client, received, context)
    metrics = {"num-examples": update.num_samples, "train-loss": update.train_loss,
               "train-seconds": update.train_seconds, "authors-flops": update.authors_flops,
               **{f"flops.{name}": getattr(update.flops, name) for name in FLOP_FIELDS}}
    if update.baseline_seconds is not None:
        metrics["baseline-seconds"] = update.baseline_seconds
    content = {UPDATE: to_array_record(update.tensors), METRICS: MetricRecord(metrics),
               CONFIG: ConfigRecord({KERNEL_PATHS: json.dumps(export_table())})}
    if update.failure:
        content[FAILURE] = ConfigRecord({"reason": update.failure})
    return Message(RecordDict(content), reply_to=message)


def evaluate(config: RunConfig, message: Message, context: Context) -> Message:
    """Receive what came down, then test the client's model (or the global one) on its test split."""
    alg = algorithm(config.algorithm)
    client, received = load_client(config, context)
    if GLOBAL in message.content.array_records:
        client.receive(from_array_record(message.content[GLOBAL]))
        received += int(alg.counts_evaluate_payload(config))
    accuracy, loss = client.evaluate()
    save_client(client, received, context)
    metrics = {"num-examples": int(client.data.y_test.shape[0]), "accuracy": accuracy, "loss": loss,
               **{f"density.{name}": value for name, value in (client.density() or {}).items()}}
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


HANDLERS = {"train": train, "evaluate": evaluate}


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """The ClientApp; ``defaults``: run-config values under the run's own (Flower's simulation engine, started
    from Python, has no run config of its own)."""
    app = ClientApp(mods=[wire_mod])

    @app.query()
    @app.train()
    @app.evaluate()
    def handle(message: Message, context: Context) -> Message:
        kind = message.metadata.message_type.split(".")[0]
        if kind == "query":
            return identify(message, context)
        run_config = {**(defaults or {}), **context.run_config}
        config, deploy = from_run_config(run_config)
        folder = context.node_config.get("state-dir") or deploy["state-dir"]
        handler = HANDLERS[kind]
        if folder:
            return persisted(lambda m, c: handler(config, m, c), config, str(folder), message, context)
        return handler(config, message, context)

    return app


app = make_client_app()
