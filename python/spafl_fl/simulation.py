"""The federated loop in one process: SpaFL or FedAvg, round by round, with accounting,
checkpoints and resume.

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

Two densities, named apart: ``weight_density`` (also ``density["total"]``), the fraction of the
sparse layers' weights in active rows; ``mean_row_density``, the unweighted mean over sparse layers of
their fraction of active rows (what the authors' code reports as "density"). Both are means over
all clients.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spafl_kernels import density, thresholds
from spafl_kernels.backends import resolve_backend
from spafl_kernels.flops import LayerFlops
from spafl_kernels.paths import export_table

from .accounting import FlopPlan, dense_state, tensor_bits, threshold_count
from .checkpoint import append_line, atomic_write_text, save_checkpoint
from .client import (
    ClientUpdate,
    FedAvgClient,
    ForwardGuard,
    LocalClient,
    SpaFLClient,
    evaluate,
    has_batchnorm,
    loader_pass,
    make_batches,
)
from .config import RunConfig
from .data import ClientData, load_dataset, split_authors, split_dirichlet
from .models import build_model
from .rundir import METRICS, check_resume_tensors, claim_out_dir, clear_outputs, read_resume
from .server import Server

log = logging.getLogger("spafl_fl")

SUMMARY_KEYS = ("algorithm", "rounds", "accuracy", "density", "uplink_bits", "downlink_bits", "dense_uplink_bits",
                "train_flops", "dense_train_flops", "paper_train_flops", "train_seconds", "baseline_train_seconds",
                "weight_density", "mean_row_density", "authors_train_flops", "authors_flops_per_client")
TIMING_KEYS = ("train_seconds", "baseline_train_seconds", "wall_seconds")
"""Record keys that measure time: they differ between any two runs; everything else is reproducible."""


def batch_seed(seed: int, round_index: int, client: int) -> int:
    """Seed of a client's batch order in a round: a function of (seed, round, client) alone."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])


@dataclass
class RunSetup:
    """What every participant of a run derives from its config alone: the backend ``auto`` resolves to
    (None for the dense FedAvg model), the clients' data, the initial model, its FLOP plan."""

    backend: str | None
    client_data: list[ClientData]
    init: nn.Module
    plan: FlopPlan
    schedule: list[list[int]] | None = None  # the clients of each round (``--split authors``); None: the server's
    batch_rng: torch.Generator | None = None  # ``--batch-order authors``: torch's global generator after the init


def authors_schedule(rng: np.random.RandomState, clients: int, sample: int, rounds: int) -> list[list[int]]:
    """The clients of each round as the authors' server draws them (``np.random.choice`` without
    replacement on the generator their split left behind), in their order (they train in it)."""
    return [[int(k) for k in rng.choice(clients, sample, replace=False)] for _ in range(rounds)]


def prepare_run(config: RunConfig, device: torch.device) -> RunSetup:
    """Load and split the data and build the initial model of ``config`` on ``device``. Deterministic in
    the config, so separate processes (a Flower server and its clients) build the very same run."""
    sparse = config.algorithm == "spafl"
    backend = resolve_backend(config.backend, "linear", device.type, torch.float32, 1) if sparse else None
    dataset = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    schedule = None
    if config.split == "authors":
        client_data, rng = split_authors(dataset, config.clients, config.alpha, config.seed,
                                         test_fraction=config.test_fraction)
        schedule = authors_schedule(rng, config.clients, config.sample, config.rounds)
    else:
        client_data = split_dirichlet(dataset, config.clients, config.alpha, config.seed,
                                      test_fraction=config.test_fraction, min_train=2)
    if config.input_scale != 1.0:
        client_data = [scale_inputs(d, config.input_scale) for d in client_data]
    init = build_model(config.model, dataset.input_shape, dataset.num_classes, sparse=sparse,
                       ste=config.ste, backend=config.backend, seed=config.seed, skip=config.skip_names(),
                       dense_classifier=config.classifier == "dense").to(device)
    batch_rng = None
    if config.batch_order == "authors":
        batch_rng = torch.Generator()
        batch_rng.set_state(torch.get_rng_state())  # as the authors' loaders find it after the model's init
    plan = FlopPlan(init, client_data[0].x_train[:2].to(device))
    return RunSetup(backend, client_data, init, plan, schedule, batch_rng)


def scale_inputs(data: ClientData, scale: float) -> ClientData:
    """``data`` with its images multiplied by ``scale`` (255: the raw pixels the authors' code trains on)."""
    return ClientData(data.x_train * scale, data.y_train, data.x_test * scale, data.y_test)


def mean_row_density(dens: dict[str, float]) -> float:
    """The authors' density: the unweighted mean over sparse layers of their fraction of active rows,
    from a per-layer ``density`` dict (``"total"`` left out); 1.0 for a dense model."""
    layers = [v for name, v in dens.items() if name != "total"]
    return float(np.mean(layers)) if layers else 1.0


def paper_metrics(dens: dict[str, float], updates: list[ClientUpdate], num_clients: int) -> dict:
    """A round record's density and FLOP fields in the paper's terms (``Simulation`` and the Flower
    strategy add the same): both densities, and the authors' FLOP count of the round (sum over the
    sampled clients, and that sum over all ``num_clients``, the authors' per-client average)."""
    authors = float(sum(u.authors_flops for u in updates))
    return {"weight_density": dens["total"], "mean_row_density": mean_row_density(dens),
            "authors_train_flops": authors, "authors_flops_per_client": authors / num_clients}


def describe_run(config: RunConfig, backend: str | None, client_data: list[ClientData], num_thresholds: int,
                 dense_state_bits: int) -> dict:
    """config.json: the flags plus what they resolved to on this machine."""
    return {
        **config.to_dict(),
        "resolved_backend": backend,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "thresholds": num_thresholds,
        "dense_state_bits": dense_state_bits,
        "client_train_samples": [d.num_train for d in client_data],
        "client_test_samples": [int(d.y_test.shape[0]) for d in client_data],
    }


def round_record(round_number: int, sampled: list[int], hp, evaluation: tuple[float, float, dict[str, float]],
                 updates: list[ClientUpdate], rejected: list[tuple[int, str]], clients: int, *,
                 uplink_bits: int, downlink_bits: int, dense_uplink_bits: int) -> dict:
    """A round's ``metrics.jsonl`` record (without ``wall_seconds``), the same for every engine.
    ``evaluation``: ``(accuracy, loss, density per layer)``; ``hp``: the round's ``LocalTraining``."""
    accuracy, loss, dens = evaluation
    baselines = [u.baseline_seconds for u in updates]
    flops = sum((u.flops for u in updates), LayerFlops())
    return {
        "round": round_number,
        "sampled": sampled,
        "lr": hp.lr,
        "th_coeff": hp.th_coeff,
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": mean_train_loss(updates),
        "density": dens,
        "uplink_bits": uplink_bits,
        "downlink_bits": downlink_bits,
        "dense_uplink_bits": dense_uplink_bits,
        "train_flops": flops.train,
        "dense_train_flops": flops.dense_train,
        "paper_train_flops": flops.paper_train,
        "train_seconds": sum(u.train_seconds for u in updates),
        "baseline_train_seconds": None if not updates or None in baselines else float(sum(baselines)),
        "rejected": [{"client": k, "reason": reason} for k, reason in rejected],
        **paper_metrics(dens, updates, clients),
    }


def mean_train_loss(updates: list[ClientUpdate]) -> float | None:
    """A round's training loss: the mean over the updates whose training finished (None if none did)."""
    losses = [u.train_loss for u in updates if u.failure is None and np.isfinite(u.train_loss)]
    return float(np.mean(losses)) if losses else None


def average_evaluation(accs: list[float], losses: list[float],
                       densities: list[dict[str, float]]) -> tuple[float, float, dict[str, float]]:
    """A round's evaluation: the mean over clients of test accuracy (%), loss, and density per layer
    and total (``{"total": 1.0}`` without densities, i.e. for a dense model)."""
    if not densities:
        return float(np.mean(accs)), float(np.mean(losses)), {"total": 1.0}
    mean_density = {name: float(np.mean([d[name] for d in densities])) for name in densities[0]}
    return float(np.mean(accs)), float(np.mean(losses)), mean_density


class Simulation:
    """A run of ``config``; with ``out_dir``, it writes config.json, metrics.jsonl and a checkpoint
    after every round there, and ``resume=True`` continues from the checkpoint found there.

    ``out_dir`` must be new or empty, unless ``resume`` (continue the run there) or ``overwrite``
    (replace the files of the run there; other files are kept). Everything is checked (the folder, and
    on resume the checkpoint and metrics.jsonl) before the data is loaded; errors name the file."""

    def __init__(self, config: RunConfig, out_dir: str | None = None, resume: bool = False,
                 overwrite: bool = False):
        self.config = config
        self.out_dir = out_dir
        found = None
        if out_dir is not None:
            claim_out_dir(out_dir, resume=resume, overwrite=overwrite)
            if resume:
                found = self._read_checkpoint()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.sparse = config.algorithm == "spafl"
        self.local = config.algorithm == "local"
        setup = prepare_run(config, self.device)
        self.backend, self.client_data, init, self.plan = setup.backend, setup.client_data, setup.init, setup.plan
        self.schedule, self.batch_rng = setup.schedule, setup.batch_rng
        self.batchnorm = has_batchnorm(init)
        self.dense_state_bits = tensor_bits(dense_state(init))
        self.num_thresholds = threshold_count(init)
        persistent = config.client_optimizer == "persistent"
        if self.sparse:
            self.clients = []
            for k, d in enumerate(self.client_data):
                model = copy.deepcopy(init)
                guard = ForwardGuard(model, config.min_density) if config.collapse_guard == "before-forward" else None
                self.clients.append(SpaFLClient(k, model, d, persistent=persistent, guard=guard))
            self.server = Server(thresholds(init), config.clients, config.sample, config.seed, "uniform")
            # lazy-last: the last round's global difference (none before the first aggregation).
            self.last_difference = {name: torch.zeros_like(t) for name, t in self.server.tensors.items()}
        elif self.local:
            self.clients = [LocalClient(k, copy.deepcopy(init), d, persistent=persistent)
                            for k, d in enumerate(self.client_data)]
            self.server = Server({}, config.clients, config.sample, config.seed, "uniform")  # sampling only
        else:
            self.fedavg_clients = [FedAvgClient(k, d) for k, d in enumerate(self.client_data)]
            self.global_model = init
            self.scratch = copy.deepcopy(init)
            state = {k: v.detach().clone() for k, v in init.state_dict().items()}
            self.server = Server(state, config.clients, config.sample, config.seed, "samples")
        self.records: list[dict] = []
        self.rounds_done = 0
        self.checkpointed = 0  # rounds in the checkpoint on disk
        if out_dir is not None:
            if found is not None:
                self._resume(*found)
            elif overwrite:
                removed = clear_outputs(out_dir)
                if removed:
                    log.info("--overwrite: removed %s of the previous run in %s", ", ".join(removed), out_dir)
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(self.describe(), indent=1))

    def describe(self) -> dict:
        """config.json: the flags plus what they resolved to on this machine."""
        return describe_run(self.config, self.backend, self.client_data, self.num_thresholds, self.dense_state_bits)

    # -- one round -----------------------------------------------------------------------------

    def run_round(self, r: int) -> dict:
        """Run round ``r`` (0-based), return its metrics record (also appended to ``self.records``)."""
        cfg = self.config
        wall = time.perf_counter()
        hp = cfg.local_training(r)
        sampled = self.schedule[r] if self.schedule is not None else self.server.sample_clients(r)
        broadcast_bits = tensor_bits(self.server.tensors)
        lazy = self.sparse and cfg.global_update in ("lazy", "lazy-last")
        last_only = cfg.global_update == "lazy-last"
        if last_only:
            broadcast_bits *= 2  # the global thresholds and the last round's difference
        updates: list[ClientUpdate] = []
        for j, k in enumerate(sampled):
            if self.batch_rng is not None:
                batches = [b for _ in range(hp.epochs)
                           for b in loader_pass(self.batch_rng, self.client_data[k].num_train, hp.batch_size)]
            else:
                gen = torch.Generator().manual_seed(batch_seed(cfg.seed, r, k))
                batches = make_batches(self.client_data[k].num_train, hp.epochs, hp.batch_size, gen,
                                       drop_single=self.batchnorm)
            if self.sparse:
                if lazy:
                    # The global change since this client last trained (lazy-last: only the last round's),
                    # applied as it starts training.
                    if last_only:
                        self.clients[k].receive_global(self.server.tensors, self.last_difference)
                    else:
                        self.clients[k].receive_global(self.server.tensors)
                # With reference chosen, the replay would time the same thing twice.
                measure = cfg.measure_baseline and self.backend != "reference"
                updates.append(self.clients[k].fit(hp, batches, plan=self.plan, measure_baseline=measure,
                                                   baseline_first=(r + j) % 2 == 1))
            elif self.local:
                updates.append(self.clients[k].fit(hp, batches, plan=self.plan))
            else:
                updates.append(self.fedavg_clients[k].fit(self.scratch, self.server.tensors, hp, batches,
                                                          plan=self.plan))
        result = self.server.aggregate(updates, round_index=r)
        if self.sparse:
            self.last_difference = result.difference
        if lazy:
            downlink = broadcast_bits * len(sampled)
        elif self.sparse:
            for client in self.clients:
                client.receive_global(result.tensors)
            downlink = tensor_bits(result.tensors) * len(self.clients)
        elif self.local:
            downlink = 0
        else:
            self.global_model.load_state_dict(result.tensors)
            downlink = broadcast_bits * len(sampled)
        record = round_record(r + 1, sampled, hp, self._evaluate(), updates, result.rejected, cfg.clients,
                              uplink_bits=sum(tensor_bits(u.tensors) for u in updates), downlink_bits=downlink,
                              dense_uplink_bits=self.dense_state_bits * len(sampled))
        record["wall_seconds"] = time.perf_counter() - wall
        self.records.append(record)
        self.rounds_done = r + 1
        return record

    def _evaluate(self) -> tuple[float, float, dict[str, float]]:
        """Mean over clients of test accuracy (%) and loss, and of density per layer and total."""
        accs, losses, densities = [], [], []
        for k, data in enumerate(self.client_data):
            if self.batch_rng is not None:  # the authors evaluate through a shuffling loader: same draws
                loader_pass(self.batch_rng, int(data.y_test.shape[0]), self.config.batch_size)
            if self.sparse:
                model = self.clients[k].model
                acc, loss = self.clients[k].evaluate()
                densities.append(density(model))
            elif self.local:
                acc, loss = self.clients[k].evaluate()
            else:
                acc, loss = evaluate(self.global_model, data)
            accs.append(acc)
            losses.append(loss)
        return average_evaluation(accs, losses, densities)

    # -- whole run, checkpoints ------------------------------------------------------------------

    def run(self, progress: bool = False) -> dict:
        """Run the remaining rounds (checkpointing each), write summary.json and plots; returns the summary."""
        from tqdm import tqdm

        if self.rounds_done:
            log.info("resuming %s after round %d", self.out_dir, self.rounds_done)
        bar = tqdm(total=self.config.rounds, initial=self.rounds_done, disable=not progress, unit="round",
                   desc=f"{self.config.algorithm} {self.config.model}/{self.config.dataset}")
        try:
            for r in range(self.rounds_done, self.config.rounds):
                record = self.run_round(r)
                if self.out_dir is not None:
                    # The line goes first: a crash before the checkpoint is complete leaves a line that
                    # resume drops, and the previous checkpoint whole.
                    append_line(os.path.join(self.out_dir, METRICS), json.dumps(record))
                    self.save()
                bar.set_postfix(acc=f"{record['accuracy']:.1f}", density=f"{record['density']['total']:.3f}")
                bar.update(1)
        finally:
            bar.close()
        summary = summarize(self.records, self.config.algorithm)
        if self.out_dir is not None:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=1))
            from .plots import plot_runs

            label = self.config.algorithm if not self.sparse else f"spafl ({self.backend})"
            plot_runs([(label, self.records)], self.out_dir)
        return summary

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs that is not a function of the config: models and server."""
        tensors = {f"server.{name}": t for name, t in self.server.tensors.items()}
        if self.sparse or self.local:
            for client in self.clients:
                tensors.update({f"client.{client.cid}.{k}": v for k, v in client.model.state_dict().items()})
        if self.sparse and self.config.global_update in ("lazy", "lazy-last"):
            # Lazy: each client holds the global thresholds of the last round it trained in.
            for client in self.clients:
                tensors.update({f"held.{client.cid}.{k}": v for k, v in client.global_thresholds.items()})
        if self.sparse and self.config.global_update == "lazy-last":
            tensors.update({f"lastdiff.{k}": v for k, v in self.last_difference.items()})
        if self.sparse:
            if self.config.collapse_guard == "before-forward":
                tensors.update({f"guard.{c.cid}": torch.tensor(list(c.guard.last.values()), dtype=torch.float64)
                                for c in self.clients})
        if self.batch_rng is not None:
            tensors["batch_rng"] = self.batch_rng.get_state()
        if (self.sparse or self.local) and self.config.client_optimizer == "persistent":
            for client in self.clients:
                tensors.update({f"momentum.{client.cid}.{k}": v for k, v in client.momentum().items()})
        return tensors

    def save(self) -> None:
        # The cpp backend's timed path choices go with the run, so that --resume replays them (same numbers).
        kernel_paths = export_table()
        atomic_write_text(os.path.join(self.out_dir, "kernel-paths.json"), json.dumps(kernel_paths, indent=0))
        save_checkpoint(self.out_dir, self.rounds_done, self.state_tensors(),
                        {"config": self.config.to_dict(), "kernel_paths": kernel_paths})
        self.checkpointed = self.rounds_done

    def _read_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
        """The checkpoint and metrics records in ``out_dir``, checked against this config before any
        data is loaded: ``(rounds done, tensors, records)``."""
        return read_resume(self.out_dir, self.config.to_dict())

    def _resume(self, rounds_done: int, tensors: dict[str, torch.Tensor], records: list[dict]) -> None:
        check_resume_tensors(self.out_dir, rounds_done, tensors, self.state_tensors())
        self.server.tensors = {name[len("server."):]: t.to(self.device) for name, t in tensors.items()
                               if name.startswith("server.")}
        if self.sparse or self.local:
            for client in self.clients:
                prefix = f"client.{client.cid}."
                client.model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.sparse:
            if self.config.global_update == "lazy-last":
                self.last_difference = {k[len("lastdiff."):]: v.to(self.device) for k, v in tensors.items()
                                        if k.startswith("lastdiff.")}
            for client in self.clients:
                if client.guard is not None:
                    client.guard.last = dict(zip(client.guard.last, tensors[f"guard.{client.cid}"].tolist()))
        if self.batch_rng is not None:
            self.batch_rng.set_state(tensors["batch_rng"])
        if (self.sparse or self.local) and self.config.client_optimizer == "persistent":
            hp = self.config.local_training(rounds_done)
            for client in self.clients:
                prefix = f"momentum.{client.cid}."
                client.load_momentum({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, hp)
        if self.sparse:
            for client in self.clients:
                held = f"held.{client.cid}."
                if self.config.global_update in ("lazy", "lazy-last"):
                    client.global_thresholds = {k[len(held):]: v.to(self.device) for k, v in tensors.items()
                                                if k.startswith(held)}
                else:
                    # Eager: every client received every broadcast, so the last global thresholds it holds are
                    # the server's.
                    client.global_thresholds = {k: v.clone() for k, v in self.server.tensors.items()}
        elif not self.local:
            self.global_model.load_state_dict(self.server.tensors)
        # Rewritten without a line of a round the checkpoint lacks or a torn last line (read_metrics).
        self.records = records
        atomic_write_text(os.path.join(self.out_dir, METRICS), "".join(json.dumps(rec) + "\n" for rec in records))
        self.rounds_done = self.checkpointed = rounds_done


def summarize(records: list[dict], algorithm: str) -> dict:
    """summary.json: final accuracy (%) and density, totals of bits, FLOPs and training seconds."""
    last = records[-1] if records else None
    baselines = [rec["baseline_train_seconds"] for rec in records]
    return {
        "algorithm": algorithm,
        "rounds": len(records),
        "accuracy": last["accuracy"] if last else None,
        "density": last["density"]["total"] if last else None,
        "uplink_bits": sum(rec["uplink_bits"] for rec in records),
        "downlink_bits": sum(rec["downlink_bits"] for rec in records),
        "dense_uplink_bits": sum(rec["dense_uplink_bits"] for rec in records),
        "train_flops": sum(rec["train_flops"] for rec in records),
        "dense_train_flops": sum(rec["dense_train_flops"] for rec in records),
        "paper_train_flops": sum(rec["paper_train_flops"] for rec in records),
        "train_seconds": sum(rec["train_seconds"] for rec in records),
        "baseline_train_seconds": None if not records or None in baselines else sum(baselines),
        "weight_density": last.get("weight_density") if last else None,
        "mean_row_density": last.get("mean_row_density") if last else None,
        "authors_train_flops": sum(rec.get("authors_train_flops", 0.0) for rec in records),
        "authors_flops_per_client": sum(rec.get("authors_flops_per_client", 0.0) for rec in records),
    }
