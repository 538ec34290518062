"""The deployment's ``ClientApp`` (``spafl_fl.flower_app.client:app``): one SuperNode is one client.

Every message is handled by the client app of the run's config (``context.run_config``): SpaFL's
(``spafl_fl.flower.client_app``) or FedAvg's (``fedavg_client_app``), wrapped in ``wire_mod``. Node
config: ``partition-id`` (which client, 0-based), ``num-partitions`` (informative), and optionally
``state-dir``: a folder on the node where a SpaFL client keeps its model after every message, so that a
resumed run (``resume = true``) continues with the weights the node had.
"""

from __future__ import annotations

import copy
import json

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import FedAvgClient, evaluate
from ..config import RunConfig
from ..flower import (
    CONFIG,
    FLOP_FIELDS,
    METRICS,
    _setup,
    client_app,
    from_array_record,
    identify,
    round_batches,
    to_array_record,
)
from . import from_run_config
from .mods import wire_mod
from .persist import persisted
from .strategy import ARRAYS


def fedavg_client_app(config: RunConfig) -> ClientApp:
    """A ``ClientApp`` running FedAvg clients of ``config``: ``train`` gets the global state
    (``ArrayRecord`` "arrays") and the round (``ConfigRecord`` "config"), trains it on the client's
    batches of that round (as ``spafl-fl run --algorithm fedavg``) and replies with the full state;
    ``evaluate`` gets the global state and replies with accuracy and loss on the client's test split."""
    if config.algorithm != "fedavg":
        raise ValueError(f"fedavg_client_app runs FedAvg; got algorithm={config.algorithm!r}")
    app = ClientApp()

    def model_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(_setup(config).init)
        model.load_state_dict(state)
        return model

    app.query()(identify)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        setup = _setup(config)
        cid = int(context.node_config["partition-id"])
        hp, batches = round_batches(config, int(message.content[CONFIG]["round"]), cid)
        scratch = copy.deepcopy(setup.init)
        update = FedAvgClient(cid, setup.client_data[cid]).fit(
            scratch, from_array_record(message.content[ARRAYS]), hp, batches, plan=setup.plan)
        metrics = {"num-examples": update.num_samples, "train-loss": update.train_loss,
                   "train-seconds": update.train_seconds,
                   **{f"flops.{name}": getattr(update.flops, name) for name in FLOP_FIELDS}}
        return Message(RecordDict({ARRAYS: to_array_record(update.tensors), METRICS: MetricRecord(metrics)}),
                       reply_to=message)

    @app.evaluate()
    def evaluate_global(message: Message, context: Context) -> Message:
        data = _setup(config).client_data[int(context.node_config["partition-id"])]
        accuracy, loss = evaluate(model_with(from_array_record(message.content[ARRAYS])), data)
        metrics = {"num-examples": int(data.y_test.shape[0]), "accuracy": accuracy, "loss": loss}
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)

    return app


_APPS: dict[str, ClientApp] = {}


def app_for(config: RunConfig) -> ClientApp:
    """The client app of ``config`` (built once per process)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _APPS:
        _APPS[key] = client_app(config) if config.algorithm == "spafl" else fedavg_client_app(config)
    return _APPS[key]


app = ClientApp(mods=[wire_mod])


@app.query()
@app.train()
@app.evaluate()
def handle(message: Message, context: Context) -> Message:
    """Hand the message to the client app of the run's config (node state kept on disk if asked)."""
    config, _ = from_run_config(context.run_config)
    handler = app_for(config)
    if config.algorithm == "spafl" and context.node_config.get("state-dir"):
        return persisted(handler, config, message, context)
    return handler(message, context)

