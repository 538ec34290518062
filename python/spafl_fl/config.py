"""A run's configuration (the CLI flags) and the per-round schedules derived from it."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch

from spafl_kernels import STES

from .algorithms import ALGORITHMS as _REGISTERED
from .algorithms import algorithm
from .client import LocalTraining
from .data import DATASETS
from .models import MODELS
from .userspec import is_spec

ALGORITHMS = tuple(_REGISTERED)
"""The registered algorithms (``algorithms``): ``spafl``: thresholds on the wire, personal weights;
``fedavg``: the dense model averaged (McMahan et al.); ``local``: every client trains its own dense model
and nothing is communicated (the control that shows what SpaFL's shared thresholds add)."""

GLOBAL_UPDATES = ("lazy", "lazy-last", "eager")
"""When a SpaFL client applies the global-threshold update (``apply_threshold_update``) to its weights.
``lazy`` (default): a client applies the whole global change since it last trained when it is next
sampled, and only sampled clients receive the global thresholds. ``lazy-last`` (what the authors' FMNIST
code does): a sampled client applies only the last round's global difference, whatever it missed before
(it receives the global thresholds and that difference). ``eager`` (the authors' CIFAR-10/100 code):
after every round every client receives the new global thresholds and applies the difference at once."""

SPLITS = ("dirichlet", "authors")
"""``dirichlet`` (default): ``data.split_dirichlet`` (seeded ``numpy.random.default_rng``, redrawn until every
client has data; datasets without a test set: each client keeps ``test_fraction`` of its share).
``authors``: the authors' ``Non_iid_split`` draw for draw (``data.split_authors``; a held-out test set,
``data.holdout_test``, where the dataset has none), and their client sampling: the same legacy numpy
generator, continued, draws each round's clients."""

CLIENT_OPTIMIZERS = ("fresh", "persistent")
"""``persistent`` (default, as the authors' code): each SpaFL or Local client keeps one SGD optimizer,
momentum buffers included, across all its rounds, so the thresholds keep rising from a round's first step
(the authors' pruning speed; README, "SpaFL against the authors' code", has the measurements). ``fresh``:
a client starts every round with a new SGD optimizer (no momentum carried over)."""

BATCH_ORDERS = ("seeded", "authors")
"""``seeded`` (default): each client's batch order in a round is a function of (seed, round, client).
``authors``: one generator continues torch's global one after the model's initialisation, and is drawn
as their ``DataLoader(shuffle=True)`` iterations draw it: two numbers per pass (the loader's base seed,
then the seed of that pass's permutation), for every training epoch of every sampled client in their
sampling order and for every client's evaluation. With ``--split authors`` this is their batch order."""

CLASSIFIERS = ("sparse", "dense")
"""The last Linear of the paper's LeNet-5, Conv4 and MLP (one row per class). ``dense`` (default): kept
dense and personal (never pruned, never sent), as the paper keeps the ResNet-18 and ViT classifiers.
``sparse``: pruned like every other layer (the authors' LeNet-5 code). A pruned class row outputs exactly
0, so on non-IID clients the shared thresholds prune the rows of classes a few clients hold, and those
classes can then only be predicted when every other logit is negative (README, "SpaFL against the
authors' code", has the measurements)."""

COLLAPSE_GUARDS = ("after-step", "before-forward")
"""The layer-collapse guard (``min_density``). ``after-step`` (default): ``reset_collapsed`` after every
optimiser step. ``before-forward`` (the authors' code): a layer whose previous forward (training or
evaluation, in any round) kept ``<= min_density`` of its rows gets its thresholds reset to 0 before the
next forward, evaluation included."""

PRESETS: dict[str, dict] = {
    # The paper's four settings (the authors' run_command.txt files over their train_argument.py
    # defaults); 100 clients, 10 sampled per round, momentum 0.9 throughout. th_coeff and lr were tuned
    # by the authors on raw 0..255 pixels: pair a preset with --input-scale 255 for parity (README).
    # FMNIST's penalty_scheduler=1 is th_warmup=1 (penalty x 0.0067 in round 0, x 0.993 from round 1).
    # The authors' CIFAR code updates eagerly: add --global-update eager for that parity.
    "fmnist-lenet5": dict(dataset="fmnist", model="lenet5", ste="identity", clip=0.0, lr=1e-3, batch_size=64,
                          local_epochs=5, alpha=0.2, th_coeff=2e-3, th_warmup=1, rounds=500),
    "cifar10-conv4": dict(dataset="cifar10", model="conv4", ste="outer", clip=3.0, lr=1e-2, batch_size=16,
                          local_epochs=5, alpha=0.1, th_coeff=1.5e-4, rounds=500),
    "cifar10-vit": dict(dataset="cifar10", model="vit", ste="outer", clip=3.0, lr=1e-2, batch_size=16,
                        local_epochs=1, alpha=0.1, th_coeff=1e-4, rounds=500),
    # No CIFAR-100 loader here: this preset sets the model and the hyperparameters; pass --dataset.
    "cifar100-resnet18": dict(model="resnet18", ste="outer", clip=15.0, lr=1e-2,
                              lr_decay=0.993, batch_size=64, local_epochs=7, alpha=0.1, th_coeff=7e-4,
                              rounds=1500),
}
for _preset in PRESETS.values():
    _preset.update(clients=100, sample=10, momentum=0.9)


@dataclass
class RunConfig:
    """Every knob of a run. Defaults suit ``mnist5k`` on a small CPU; the paper's FMNIST run is
    ``clients=100, sample=10, rounds=500, local_epochs=5, batch_size=64, lr=0.001, th_coeff=0.002,
    alpha=0.2`` (README of the authors' code)."""

    algorithm: str = "spafl"
    dataset: str = "mnist5k"
    data_dir: str | None = None
    model: str = "lenet5"
    clients: int = 10
    sample: int = 5
    rounds: int = 40
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    lr_decay: float = 1.0  # lr of round r: lr * lr_decay**r
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float = 0.0  # max gradient norm; 0: no clipping
    th_coeff: float = 0.002
    th_warmup: int = 0  # rounds of the sigmoid warm-up of th_coeff; 0: constant
    alpha: float = 0.2  # Dirichlet concentration of the non-IID split
    test_fraction: float = 0.2  # per-client test share, for datasets without an official test set
    ste: str = "identity"
    backend: str = "auto"
    min_density: float = 0.01
    seed: int = 1
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0: leave as is
    measure_baseline: bool = True  # replay each client's batches with backend="reference" to time it
    global_update: str = "lazy"  # one of GLOBAL_UPDATES
    split: str = "dirichlet"  # one of SPLITS
    client_optimizer: str = "persistent"  # one of CLIENT_OPTIMIZERS
    collapse_guard: str = "after-step"  # one of COLLAPSE_GUARDS
    batch_order: str = "seeded"  # one of BATCH_ORDERS
    input_scale: float = 1.0  # inputs are multiplied by it (255: the raw pixels the authors' code trains on)
    preset: str | None = None  # the PRESETS entry the values came from (a record; flags given override it)
    skip: str = ""  # comma-separated layers of a MODULE:CALLABLE model that stay dense
    classifier: str | None = None  # one of CLASSIFIERS; None: default_classifier(model)

    def skip_names(self) -> list[str]:
        return [name.strip() for name in self.skip.split(",") if name.strip()]

    def __post_init__(self) -> None:
        if self.classifier is None:
            self.classifier = default_classifier(self.model)
        problems = config_problems(self.to_dict())
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RunConfig:
        """The paper's setting ``name`` (one of ``PRESETS``), with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def th_coeff_at(self, round_index: int) -> float:
        """``th_coeff``, times the paper's sigmoid warm-up ``1 / (1 + exp(5 - 10 r / th_warmup))``
        when ``th_warmup > 0`` (the FMNIST code's ``penalty_scheduler``)."""
        if self.th_warmup <= 0:
            return self.th_coeff
        return self.th_coeff / (1.0 + math.exp(5.0 - 10.0 * round_index / self.th_warmup))

    def local_training(self, round_index: int) -> LocalTraining:
        """Round ``round_index``'s local hyperparameters (0-based rounds; lr decays once per round)."""
        sparse = algorithm(self.algorithm).sparse
        return LocalTraining(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr * self.lr_decay ** round_index,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            clip=self.clip,
            th_coeff=self.th_coeff_at(round_index) if sparse else 0.0,
            min_density=self.min_density,
        )


MAX_COUNT = 2**31 - 1
"""Largest clients, sample, rounds, local epochs, batch size or warm-up rounds (larger ones overflow torch's
int32 indexing or run for ever)."""
MAX_THREADS = 1024
"""Largest ``threads`` anywhere (torch crashes creating ~100,000); a command running here also caps it at
this machine's CPU count."""
MAX_LR = 1e6
"""Largest learning rate of any round (``lr * lr_decay**r``): beyond it SGD's step overflows float32."""


def default_classifier(model: str) -> str:
    """The classifier setting a run gets unless it names one: ``dense`` for the paper's models; ``sparse`` for a
    ``MODULE:CALLABLE`` model, every layer of which is sparse but those named in ``skip``."""
    return "sparse" if is_spec(model) else "dense"


def _number(value, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def config_problems(values: dict, flags: bool = False) -> list[str]:
    """Why ``values`` (``RunConfig`` fields) is not a valid configuration: one string per problem, each
    naming the field (``flags``: the ``spafl-fl run`` flag, e.g. ``--weight-decay``); empty when valid."""

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    def need(key: str, ok, what: str) -> None:
        value = values[key]
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            problems.append(f"{name(key)} must be {what} (got {value!r})")

    problems: list[str] = []
    need("algorithm", lambda v: v in _REGISTERED, f"one of {', '.join(_REGISTERED)}")
    need("dataset", lambda v: v in DATASETS or is_spec(v), f"one of {', '.join(DATASETS)} or MODULE:CALLABLE")
    need("model", lambda v: v in MODELS or is_spec(v), f"one of {', '.join(MODELS)} or MODULE:CALLABLE")
    need("skip", lambda v: isinstance(v, str), "comma-separated layer names")
    if isinstance(values["skip"], str) and values["skip"].strip() and not is_spec(values["model"]):
        problems.append(f"{name('skip')} names layers of a {name('model')} MODULE:CALLABLE; "
                        f"{values['model']!r} keeps the paper's dense layers")
    need("ste", lambda v: v in STES, f"one of {', '.join(STES)}")
    for key in ("clients", "sample", "local_epochs", "batch_size"):
        need(key, lambda v: _number(v, True) and 1 <= v <= MAX_COUNT, f"an integer in [1, {MAX_COUNT}]")
    if not problems and values["sample"] > values["clients"]:
        problems.append(f"{name('sample')} ({values['sample']}) must be at most {name('clients')} "
                        f"({values['clients']})")
    # A command line asks for a run: at least one round (a Simulation object may be built with none).
    least = 1 if flags else 0
    need("rounds", lambda v: _number(v, True) and least <= v <= MAX_COUNT, f"an integer in [{least}, {MAX_COUNT}]")
    need("th_warmup", lambda v: _number(v, True) and 0 <= v <= MAX_COUNT, f"an integer in [0, {MAX_COUNT}]")
    need("threads", lambda v: _number(v, True) and 0 <= v <= MAX_THREADS, f"an integer in [0, {MAX_THREADS}]")
    need("seed", lambda v: _number(v, True) and 0 <= v < 2**63, "an integer in [0, 2**63)")
    for key in ("lr", "lr_decay", "alpha"):
        need(key, lambda v: _number(v) and v > 0, "a finite number > 0")
    if not any(p.startswith((name("lr") + " ", name("lr_decay") + " ", name("rounds") + " ")) for p in problems):
        last = max(values["rounds"] - 1, 0)
        # In logs: lr * lr_decay**r overflows a float long before it is compared.
        peak = math.log(values["lr"]) + max(math.log(values["lr_decay"]), 0.0) * last
        if peak > math.log(MAX_LR):
            problems.append(f"{name('lr')} and {name('lr_decay')} must keep every round's learning rate "
                            f"(lr * lr_decay**round) at most {MAX_LR:g} (got lr {values['lr']!r}, lr_decay "
                            f"{values['lr_decay']!r} over {values['rounds']} rounds)")
    for key in ("momentum", "weight_decay", "clip", "th_coeff"):
        need(key, lambda v: _number(v) and v >= 0, "a finite number >= 0")
    need("min_density", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    need("test_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)")
    need("global_update", lambda v: v in GLOBAL_UPDATES, f"one of {', '.join(GLOBAL_UPDATES)}")
    need("split", lambda v: v in SPLITS, f"one of {', '.join(SPLITS)}")
    need("client_optimizer", lambda v: v in CLIENT_OPTIMIZERS, f"one of {', '.join(CLIENT_OPTIMIZERS)}")
    need("batch_order", lambda v: v in BATCH_ORDERS, f"one of {', '.join(BATCH_ORDERS)}")
    need("collapse_guard", lambda v: v in COLLAPSE_GUARDS, f"one of {', '.join(COLLAPSE_GUARDS)}")
    need("classifier", lambda v: v in CLASSIFIERS, f"one of {', '.join(CLASSIFIERS)}")
    if values["classifier"] == "dense" and is_spec(values["model"]):
        problems.append(f"{name('classifier')} dense applies to the paper's models; name your model's "
                        f"classifier in {name('skip')} instead")
    need("input_scale", lambda v: _number(v) and v > 0, "a finite number > 0")
    need("preset", lambda v: v is None or v in PRESETS, f"one of {', '.join(PRESETS)}")
    problem = device_problem(values["device"])
    if problem:
        problems.append(f"{name('device')} {problem}")
    return problems


RUN_ONLY = {"split": "dirichlet", "batch_order": "seeded"}
"""Settings only ``spafl-fl run`` implements (the authors' behaviours), with the value the Flower engines run."""


def run_only_problems(values: dict) -> list[str]:
    """Why ``values`` cannot run on the Flower engines: the authors' behaviours only ``spafl-fl run`` has."""
    problems = [f"--{key.replace('_', '-')} {values[key]} runs only in spafl-fl run (Flower runs {default})"
                for key, default in RUN_ONLY.items() if values.get(key, default) != default]
    if values.get("global_update") == "lazy-last":
        problems.append("--global-update lazy-last runs only in spafl-fl run (Flower runs lazy and eager)")
    return problems


def device_problem(device) -> str | None:
    """Why ``device`` cannot run a run here (None when it can): only cpu and an existing cuda device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"must be cpu or cuda[:N] (got {device!r})"
    if dev.type == "cpu":
        return None if dev.index in (None, 0) else f"must be cpu or cuda[:N] (got {device!r}: there is one cpu device)"
    if dev.type != "cuda":
        return f"must be cpu or cuda[:N] (got {device!r})"
    if not torch.cuda.is_available():
        return f"{device!r}: CUDA is not available here (torch {torch.__version__}, no CUDA device)"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{device!r}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def threads_problems(threads) -> list[str]:
    """``--threads`` above this machine's CPU count (torch crashes creating very many threads)."""
    cpus = os.cpu_count() or 1
    if isinstance(threads, int) and threads > cpus:
        return [f"--threads must be at most this machine's {cpus} CPUs (got {threads})"]
    return []
