"""The in-process engine: every registered algorithm (``algorithms``), round by round in one process, with
accounting, checkpoints and resume through the engine-neutral core (``core``, ``recorder``).

SpaFL round ``r`` (docs/DESIGN.md §2, the paper's code): the server samples clients; each sampled client
loads the global thresholds it holds, trains weights and thresholds, and uploads its thresholds; the
server averages them. When the clients apply the global change to their weights
(``apply_threshold_update`` with the difference of the global thresholds) is ``global_update``:

- ``lazy`` (default): a sampled client receives the current global thresholds at the start of the
  round and applies the sum of the global differences since it last trained (new global minus the one
  it last held); a client not sampled receives nothing. ``lazy-last`` (the authors' FMNIST code): the
  same, but it applies only the last round's global difference.
- ``eager`` (the authors' CIFAR-10/100 code): after aggregation the new global thresholds go to every
  client, which applies the difference at once.

Every client is then evaluated on its own test split with its own model. FedAvg round ``r``: the
sampled clients receive the global dense state, train it and upload it; the server averages
(weighted by samples); the global model is evaluated on every client's test split. Local round
``r``: the sampled clients train their own dense models; nothing is sent; every client's own model
is evaluated.

Wire accounting per round. SpaFL: uplink = the sampled clients' thresholds; downlink = the global
thresholds to the sampled clients (lazy) or to every client (eager). FedAvg: uplink = the sampled
clients' full state; downlink = the global state to the sampled clients. Local: nothing.
``dense_uplink_bits`` is FedAvg's uplink for the same architecture (full dense state, buffers
included, per sampled client).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from .accounting import dense_state, tensor_bits, threshold_count
from .algorithms import algorithm
from .client import ClientUpdate, loader_pass
from .config import RunConfig
from .core import (  # noqa: F401  (re-exported: the names this module has always offered)
    SUMMARY_KEYS,
    TIMING_KEYS,
    RunSetup,
    average_evaluation,
    batch_seed,
    describe_run,
    mean_row_density,
    paper_metrics,
    prepare_run,
    round_batches,
    round_record,
    summarize,
)
from .recorder import Recorded, RunRecorder
from .server import Server

log = logging.getLogger("spafl_fl")


class Simulation(Recorded):
    """A run of ``config``; with ``out_dir``, it writes config.json, metrics.jsonl and a checkpoint
    after every round there, and ``resume=True`` continues from the checkpoint found there.

    ``out_dir`` must be new or empty, unless ``resume`` (continue the run there) or ``overwrite``
    (replace the files of the run there; other files are kept). Everything is checked (the folder, and
    on resume the checkpoint and metrics.jsonl) before the data is loaded; errors name the file."""

    def __init__(self, config: RunConfig, out_dir: str | None = None, resume: bool = False,
                 overwrite: bool = False):
        self.config = config
        self.out_dir = out_dir
        self.algorithm = algorithm(config.algorithm)
        self.recorder = RunRecorder(config, out_dir, resume=resume, overwrite=overwrite)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        setup = prepare_run(config, self.device)
        self.setup = setup
        self.backend, self.client_data, init, self.plan = setup.backend, setup.client_data, setup.init, setup.plan
        self.schedule, self.batch_rng = setup.schedule, setup.batch_rng
        self.dense_state_bits = tensor_bits(dense_state(init))
        self.num_thresholds = threshold_count(init)
        # Clients that keep no model of their own share one scratch model: each message loads into it first.
        scratch = None if self.algorithm.personal else copy.deepcopy(init)
        self.clients = [self.algorithm.make_client(k, copy.deepcopy(init) if scratch is None else scratch, d, config)
                        for k, d in enumerate(self.client_data)]
        self.server = Server(self.algorithm.server_tensors(init), config.clients, config.sample, config.seed,
                             self.algorithm.weighting)
        # lazy-last: the last round's global difference (none before the first aggregation).
        self.last_difference = {name: torch.zeros_like(t) for name, t in self.server.tensors.items()
                                if t.is_floating_point()}
        if self.recorder.resuming:
            self._resume()
        self.recorder.start(self.describe())

    @property
    def global_model(self) -> torch.nn.Module:
        """The model a client without a model of its own evaluates (FedAvg: the global one after a round)."""
        return self.clients[0].model

    def describe(self) -> dict:
        """config.json: the flags plus what they resolved to on this machine."""
        return describe_run(self.config, self.backend, self.client_data, self.num_thresholds, self.dense_state_bits)

    # -- one round -----------------------------------------------------------------------------

    def _batches(self, r: int, k: int) -> list[torch.Tensor]:
        if self.batch_rng is None:
            return round_batches(self.config, self.setup, r, k)
        hp = self.config.local_training(r)
        return [b for _ in range(hp.epochs) for b in loader_pass(self.batch_rng, self.client_data[k].num_train,
                                                                 hp.batch_size)]

    def run_round(self, r: int) -> dict:
        """Run round ``r`` (0-based), return its metrics record (also appended to ``self.records``)."""
        cfg, alg = self.config, self.algorithm
        wall = time.perf_counter()
        hp = cfg.local_training(r)
        sampled = self.schedule[r] if self.schedule is not None else self.server.sample_clients(r)
        # With reference chosen, the replay would time the same thing twice.
        measure = alg.timed_replay and cfg.measure_baseline and self.backend != "reference"
        downlink = 0
        updates: list[ClientUpdate] = []
        for j, k in enumerate(sampled):
            batches = self._batches(r, k)
            payload = alg.train_payload(cfg, self.server.tensors, self.last_difference)
            if payload is not None:
                self.clients[k].receive(payload)
                downlink += tensor_bits(payload)
            updates.append(self.clients[k].fit(hp, batches, plan=self.plan, measure_baseline=measure,
                                               baseline_first=(r + j) % 2 == 1))
        result = self.server.aggregate(updates, round_index=r)
        self.last_difference = result.difference
        evaluation = self._evaluate()
        if alg.counts_evaluate_payload(cfg):
            downlink += tensor_bits(result.tensors) * len(self.clients)
        record = round_record(r + 1, sampled, hp, evaluation, updates, result.rejected, cfg.clients,
                              uplink_bits=sum(tensor_bits(u.tensors) for u in updates), downlink_bits=downlink,
                              dense_uplink_bits=self.dense_state_bits * len(sampled),
                              wall_seconds=time.perf_counter() - wall)
        self.recorder.record(record)
        return record

    def _evaluate(self) -> tuple[float, float, dict[str, float]]:
        """What goes down with the evaluation (a broadcast, or the global model), then the mean over clients
        of test accuracy (%) and loss, and of density per layer and total."""
        payload = self.algorithm.evaluate_payload(self.server.tensors, self.config)
        accs, losses, densities = [], [], []
        for client, data in zip(self.clients, self.client_data):
            if self.batch_rng is not None:  # the authors evaluate through a shuffling loader: same draws
                loader_pass(self.batch_rng, int(data.y_test.shape[0]), self.config.batch_size)
            if payload is not None:
                client.receive(payload)
            acc, loss = client.evaluate()
            dens = client.density()
            if dens is not None:
                densities.append(dens)
            accs.append(acc)
            losses.append(loss)
        return average_evaluation(accs, losses, densities)

    # -- whole run, checkpoints ------------------------------------------------------------------

    def run(self, progress: bool = False) -> dict:
        """Run the remaining rounds (checkpointing each), write summary.json and plots; returns the summary."""
        from tqdm import tqdm

        bar = tqdm(total=self.config.rounds, initial=self.rounds_done, disable=not progress, unit="round",
                   desc=f"{self.config.algorithm} {self.config.model}/{self.config.dataset}")
        try:
            for r in range(self.rounds_done, self.config.rounds):
                record = self.run_round(r)
                self.save()
                bar.set_postfix(acc=f"{record['accuracy']:.1f}", density=f"{record['density']['total']:.3f}")
                bar.update(1)
        finally:
            bar.close()
        label = f"{self.config.algorithm} ({self.backend})" if self.backend else self.config.algorithm
        return self.recorder.finish(label)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs that is not a function of the config: server and clients."""
        tensors = {f"server.{name}": t for name, t in self.server.tensors.items()}
        if self.config.global_update == "lazy-last":
            tensors.update({f"lastdiff.{k}": v for k, v in self.last_difference.items()})
        for client in self.clients:
            tensors.update({_client_key(k, client.cid): v for k, v in client.state().items()})
        if self.batch_rng is not None:
            tensors["batch_rng"] = self.batch_rng.get_state()
        return tensors

    def save(self) -> None:
        self.recorder.checkpoint(self.state_tensors())

    def _resume(self) -> None:
        tensors = self.recorder.resume(self.state_tensors())
        self.server.tensors = {name[len("server."):]: t.to(self.device) for name, t in tensors.items()
                               if name.startswith("server.")}
        if self.config.global_update == "lazy-last":
            self.last_difference = {k[len("lastdiff."):]: v.to(self.device) for k, v in tensors.items()
                                    if k.startswith("lastdiff.")}
        hp = self.config.local_training(self.recorder.rounds_done)
        states: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            part, cid, rest = _split_client_key(name)
            if cid is not None:
                states.setdefault(cid, {})[part + rest] = t
        for client in self.clients:
            client.load_state(states.get(client.cid, {}), hp)
        if self.batch_rng is not None:
            self.batch_rng.set_state(tensors["batch_rng"])
        if not self.algorithm.personal:
            self.clients[0].receive(self.server.tensors)  # the global model, as the last round left it


_CLIENT_PARTS = ("client", "held", "momentum", "guard")
"""The parts of a client's ``state()`` a checkpoint holds, named ``<part>.<cid>[.<tensor>]``."""


def _client_key(key: str, cid: int) -> str:
    """``state()``'s ``part[.tensor]`` as the checkpoint names it for client ``cid``: ``part.cid[.tensor]``."""
    part, dot, rest = key.partition(".")
    return f"{part}.{cid}{dot}{rest}"


def _split_client_key(name: str) -> tuple[str, int | None, str]:
    """``_client_key``'s inverse: ``(part, cid, ".tensor" or "")``; cid None for a name of no client."""
    part, _, rest = name.partition(".")
    cid, dot, tail = rest.partition(".")
    if part not in _CLIENT_PARTS or not cid.isdigit():
        return name, None, ""
    return part, int(cid), dot + tail
