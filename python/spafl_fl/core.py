"""The engine-neutral core of a run: what every participant derives from the config (``prepare_run``), the
batches of a client's round, and the one builder of a round's record and of the run's summary.

The three engines (in-process ``simulation``, Flower's simulation ``flower`` and deployment ``deploy``, the
latter two through the one Flower app in ``flower_app``) stand side by side on this module, ``algorithms``
(what each algorithm does) and ``recorder`` (the run folder); none imports another (docs/DESIGN.md §3).

Two densities, named apart: ``weight_density`` (also ``density["total"]``), the fraction of the sparse
layers' weights in active rows; ``mean_row_density``, the unweighted mean over sparse layers of their
fraction of active rows (what the authors' code reports as "density"). Both are means over all clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spafl_kernels.backends import resolve_backend
from spafl_kernels.flops import LayerFlops

from .accounting import FlopPlan
from .algorithms import algorithm
from .client import ClientUpdate, has_batchnorm, make_batches
from .config import RunConfig
from .data import ClientData, load_dataset, split_authors, split_dirichlet
from .models import build_model

SUMMARY_KEYS = ("algorithm", "rounds", "accuracy", "density", "uplink_bits", "downlink_bits", "dense_uplink_bits",
                "train_flops", "dense_train_flops", "paper_train_flops", "train_seconds", "baseline_train_seconds",
                "weight_density", "mean_row_density", "authors_train_flops", "authors_flops_per_client")
WIRE_KEYS = ("uplink_wire_bits", "downlink_wire_bits", "client_compute_seconds", "client_cpu_seconds")
"""What Flower carried in a round (its ``count_bytes`` of every message's records, per direction) and the clients'
handler time; null in the in-process loop, which carries nothing."""
TIMING_KEYS = ("train_seconds", "baseline_train_seconds", "wall_seconds", "client_compute_seconds",
               "client_cpu_seconds")
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
    sparse = algorithm(config.algorithm).sparse
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


def round_batches(config: RunConfig, setup: RunSetup, r: int, cid: int) -> list[torch.Tensor]:
    """Client ``cid``'s index batches of round ``r`` (``--batch-order seeded``): a function of (seed, round,
    client) alone, so every engine and process draws the same."""
    hp = config.local_training(r)
    gen = torch.Generator().manual_seed(batch_seed(config.seed, r, cid))
    return make_batches(setup.client_data[cid].num_train, hp.epochs, hp.batch_size, gen,
                        drop_single=has_batchnorm(setup.init))


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
                 uplink_bits: int, downlink_bits: int, dense_uplink_bits: int,
                 rejected_evaluations: list[tuple[int, str]] = (), wire: dict | None = None,
                 wall_seconds: float) -> dict:
    """A round's ``metrics.jsonl`` record, the same keys in every engine. ``evaluation``: ``(accuracy, loss,
    density per layer)``; ``hp``: the round's ``LocalTraining``; ``wire``: ``WIRE_KEYS`` (Flower engines)."""
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
        "rejected_evaluations": [{"client": k, "reason": reason} for k, reason in rejected_evaluations],
        **{key: (wire or {}).get(key) for key in WIRE_KEYS},
        "wall_seconds": wall_seconds,
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
