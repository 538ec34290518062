"""Whole training steps of the paper's models (docs/DESIGN.md §5): what a SpaFL user waits for.

One step = ``zero_grad`` + forward + cross entropy + backward + SGD-momentum step, on the model with
the paper's STE and batch size. Candidates, timed interleaved in one run (medians):

- ``dense``: the same model with plain ``nn.Linear``/``nn.Conv2d`` (what FedAvg trains);
- ``masked``: the sparse model with every sparse layer computed as the paper's masked dense
  (``masked.PaperMaskedLayer``: the paper's code);
- ``static``: every sparse layer physically cut to its active rows (a plain dense op on those rows,
  outputs scattered into zeros), no scores, no STE: what static structured pruning gives. Its time
  is the **static limit**; a backend's ``of static`` is ``t_static / t_backend``;
- every kernel backend that runs on the device.

Densities: every sparse layer at the same fraction of active rows (random rows; at least one per
layer), or a measured per-layer profile from a ``spafl-fl`` run (``density_profile``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..flops import FlopCounter
from ..modules import SparseConv2d, SparseLayer
from ..whole_model import sparse_layers
from ..zoo import MODELS, build_model
from .masked import PaperMaskedLayer
from .records import provenance
from .timing import medians, time_interleaved

BASELINES = ("dense", "masked", "static")
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
"""Densities a ``--models`` run times unless told otherwise."""


@dataclass(frozen=True)
class ModelSetup:
    """How the paper trains a model: input ``[C, H, W]``, classes, STE and batch size."""

    input_shape: tuple[int, int, int]
    num_classes: int
    ste: str
    batch: int


SETUPS = {
    "lenet5": ModelSetup((1, 28, 28), 10, "identity", 64),  # FMNIST
    "conv4": ModelSetup((3, 32, 32), 10, "outer", 16),  # CIFAR-10
    "resnet18": ModelSetup((3, 32, 32), 100, "outer", 64),  # CIFAR-100, half width
    "vit": ModelSetup((3, 32, 32), 10, "outer", 16),  # CIFAR-10
    "mlp": ModelSetup((1, 28, 28), 10, "identity", 64),  # LeNet-300-100 on FMNIST
}
assert set(SETUPS) == set(MODELS)


def set_densities(model: nn.Module, densities: float | Mapping[str, float], seed: int = 0) -> dict[str, int]:
    """Set every sparse layer's thresholds so that ``max(1, round(d * rows))`` random rows are active,
    ``d`` the layer's density (one float for all, or a mapping by layer name). Active rows get score
    0.5; pruned rows scores in (-0.75, -0.25): gate closed under ``outer``, open under the others,
    as the layer benchmark does. Returns the active row count per layer."""
    gen = torch.Generator().manual_seed(seed)
    active = {}
    with torch.no_grad():
        for name, layer in sparse_layers(model):
            density = densities if isinstance(densities, (int, float)) else densities[name]
            rows = layer.weight.shape[0]
            count = max(1, round(density * rows))
            score = -torch.rand(rows, generator=gen) * 0.5 - 0.25
            score[torch.randperm(rows, generator=gen)[:count]] = 0.5
            mean_abs = layer.weight.detach().abs().reshape(rows, -1).mean(1)
            layer.threshold.copy_(mean_abs - score.to(mean_abs))
            active[name] = count
    return active


class _StaticLayer(nn.Module):
    """A sparse layer cut to its active rows: the dense op on ``weight[active]``, outputs scattered
    into zeros (the row order of the sparse layer's output is kept)."""

    def __init__(self, layer: SparseLayer):
        super().__init__()
        index = layer.mask().nonzero().squeeze(1)
        self.register_buffer("index", index)
        self.rows = layer.weight.shape[0]
        self.weight = nn.Parameter(layer.weight.detach()[index].clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach()[index].clone())
        self.conv = None
        if isinstance(layer, SparseConv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}
            if layer.groups != 1:
                raise ValueError("the static model cuts only groups=1 convolutions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        every_row = self.index.numel() == self.rows  # nothing was cut: the plain dense layer
        if self.conv is None:
            z = F.linear(x, self.weight, self.bias)
            return z if every_row else z.new_zeros(*z.shape[:-1], self.rows).index_copy_(-1, self.index, z)
        z = F.conv2d(x, self.weight, self.bias, **self.conv)
        return z if every_row else z.new_zeros(z.shape[0], self.rows, *z.shape[2:]).index_copy_(1, self.index, z)


def static_model(model: nn.Module) -> nn.Module:
    """A copy of the sparse ``model`` with every sparse layer cut to its active rows (``_StaticLayer``)."""
    return _replaced_layers(model, _StaticLayer)


def _replaced_layers(model: nn.Module, replace: Callable[[SparseLayer], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every sparse layer ``layer`` (of the copy) swapped for ``replace(layer)``."""
    copied = copy.deepcopy(model)
    for name, layer in list(sparse_layers(copied)):
        parent, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent), child, replace(layer))
    return copied


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One SGD-momentum training step of ``model`` on a fixed batch, as a no-argument function."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)  # tiny lr: the masks stay put

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


@dataclass(frozen=True)
class DensityProfile:
    """The per-layer densities of a run's last round, and whether that run kept its classifier dense."""

    densities: dict[str, float]
    dense_classifier: bool = False


def density_profile(run_dir: str) -> tuple[str, DensityProfile]:
    """``(model name, profile)`` of the last round of a ``spafl-fl`` run in ``run_dir``."""
    config_path, metrics_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "metrics.jsonl")
    for path in (config_path, metrics_path):
        if not os.path.isfile(path):
            raise ValueError(f"--density-from {run_dir}: no {os.path.basename(path)} (not a spafl-fl run folder)")
    try:
        with open(config_path) as f:
            config = json.load(f)
        model = config["model"]
        # A run from before the classifier setting pruned it; a run since records "dense" or "sparse".
        dense_classifier = config.get("classifier", "sparse") == "dense"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--density-from: {config_path} is damaged ({error})") from None
    if model not in MODELS:
        raise ValueError(f"--density-from: {config_path} names model {model!r}; expected one of {list(MODELS)}")
    try:
        with open(metrics_path, encoding="utf-8") as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
        number, line = lines[-1]
        record = json.loads(line)
    except IndexError:
        raise ValueError(f"--density-from: {metrics_path} holds no round") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--density-from: {metrics_path} is damaged ({error})") from None
    densities = record.get("density") if isinstance(record, dict) else None
    if not isinstance(densities, dict) or not densities or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d <= 1.0 for d in densities.values()):
        raise ValueError(f"--density-from: {metrics_path} line {number} is damaged: 'density' must map layer names "
                         f"to numbers in [0, 1] (got {densities!r})")
    return model, DensityProfile({name: float(d) for name, d in densities.items() if name != "total"},
                                 dense_classifier)


def candidate_models(
    name: str, density: float | Mapping[str, float], candidates: Sequence[str], device: str = "cpu",
    dense_classifier: bool = False,
) -> tuple[dict[str, nn.Module], nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """``({candidate: model}, the sparse model, (x, target))`` for model ``name`` at ``density``:
    ``dense`` and ``static`` always, and each of ``candidates`` (``masked``: ``masked.PaperMaskedLayer``).
    Every candidate starts from the same weights; the batch is the paper's. ``dense_classifier``: the
    model's last Linear stays dense (``zoo.build_model``)."""
    setup = SETUPS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch, *setup.input_shape, generator=gen).to(device)
    target = torch.randint(setup.num_classes, (setup.batch,), generator=gen).to(device)
    sparse = build_model(name, setup.input_shape, setup.num_classes, ste=setup.ste, seed=0,
                         dense_classifier=dense_classifier).to(device)
    set_densities(sparse, density)
    models = {
        "dense": build_model(name, setup.input_shape, setup.num_classes, sparse=False, seed=0).to(device),
        "static": static_model(sparse),
    }
    for candidate in candidates:
        if candidate == "masked":
            models[candidate] = _replaced_layers(sparse, PaperMaskedLayer)
            continue
        model = copy.deepcopy(sparse)
        for _, layer in sparse_layers(model):
            layer.backend = candidate
        models[candidate] = model
    return models, sparse, (x, target)


def run_models(
    models: Sequence[str],
    densities: Sequence[float],
    candidates: Sequence[str],
    reps: int,
    device: str = "cpu",
    profiles: Mapping[str, DensityProfile] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """One row per (model, density, candidate): median step seconds, speed-up over dense, masked
    and static, executed FLOPs over dense FLOPs. ``profiles``: per-model layer densities measured in
    a run (``density_profile``), timed as density ``"profile"`` besides the uniform ones."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name in models:
        settings = [(d, d, False) for d in densities]
        if profiles and name in profiles:
            settings.append(("profile", profiles[name].densities, profiles[name].dense_classifier))
        for label, density, dense_classifier in settings:
            by_candidate, sparse, (x, target) = candidate_models(name, density, candidates, device, dense_classifier)
            with FlopCounter(sparse) as counter:
                sparse(x)
            layers = dict(sparse_layers(sparse))
            active = {n: int(layer.mask().sum()) for n, layer in layers.items()}
            steps = {c: training_step(m, x, target) for c, m in by_candidate.items()}
            timings = time_interleaved(steps, reps, sync=sync, clock=clock)
            times = medians(timings)
            weights = sum(layer.weight.numel() for layer in layers.values())
            kept = sum(active[n] * layer.fan_in for n, layer in layers.items())
            for candidate, seconds in times.items():
                row = {
                    "model": name, "ste": SETUPS[name].ste, "batch": SETUPS[name].batch,
                    "density": label if label == "profile" else float(label),
                    "weight_density": kept / weights,
                    "row_density": sum(active[n] / layer.weight.shape[0] for n, layer in layers.items()) / len(layers),
                    "candidate": candidate, "seconds": seconds, "p20_seconds": timings[candidate]["p20"],
                    "p80_seconds": timings[candidate]["p80"],
                    "vs_dense": times["dense"] / seconds,
                    "vs_masked": times["masked"] / seconds if "masked" in times else None,
                    "of_static": times["static"] / seconds,
                    "flops_vs_dense": 1.0 if candidate in ("dense", "masked")
                    else counter.total.train / max(counter.total.dense_train, 1),
                }
                rows.append(row)
                progress(format_model_row(row))
    return rows


_COLUMNS = [
    ("model", 9, lambda r: r["model"]),
    ("density", 8, lambda r: r["density"] if r["density"] == "profile" else f"{r['density']:.2f}"),
    ("candidate", 10, lambda r: r["candidate"]),
    ("step ms", 9, lambda r: f"{r['seconds'] * 1e3:.2f}"),
    ("p20-p80 ms", 14, lambda r: f"{r['p20_seconds'] * 1e3:.2f}-{r['p80_seconds'] * 1e3:.2f}"
     if "p20_seconds" in r else ""),
    ("vs dense", 9, lambda r: f"{r['vs_dense']:.2f}x"),
    ("vs masked", 10, lambda r: "n/a" if r["vs_masked"] is None else f"{r['vs_masked']:.2f}x"),
    ("FLOPs/dense", 12, lambda r: f"{r['flops_vs_dense']:.2f}"),
    ("of static", 10, lambda r: f"{r['of_static']:.2f}"),
]


def format_model_row(row: dict) -> str:
    return "".join(f"{fmt(row):>{width}} " for _, width, fmt in _COLUMNS).rstrip()


def model_table(rows: list[dict], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(name for name, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(fmt(r) for _, _, fmt in _COLUMNS) + " |" for r in rows])
    header = "".join(f"{name:>{width}} " for name, width, _ in _COLUMNS).rstrip()
    return "\n".join([header, "-" * len(header), *(format_model_row(r) for r in rows)])


def model_targets(rows: list[dict]) -> list[str]:
    """Where each kernel backend stands against the whole-model targets of docs/DESIGN.md §5."""
    lines = []
    backends = [c for c in dict.fromkeys(r["candidate"] for r in rows) if c not in BASELINES]
    uniform = [r for r in rows if r["density"] != "profile"]
    for backend in backends:
        mine = [r for r in uniform if r["candidate"] == backend]
        full = [r for r in mine if r["density"] == 1.0]
        low = [r for r in mine if r["density"] <= 0.5]
        checks = [
            ("every model at density 1 >= 0.98x dense", full, lambda r: r["vs_dense"] >= 0.98, "vs_dense", "x"),
            ("every model at density <= 0.5 >= 0.95 of the static limit", low, lambda r: r["of_static"] >= 0.95,
             "of_static", ""),
            ("lenet5 at 0.1 >= 3x dense", [r for r in mine if r["model"] == "lenet5" and r["density"] == 0.1],
             lambda r: r["vs_dense"] >= 3.0, "vs_dense", "x"),
            ("vit at 0.1 >= 1.8x dense", [r for r in mine if r["model"] == "vit" and r["density"] == 0.1],
             lambda r: r["vs_dense"] >= 1.8, "vs_dense", "x"),
        ]
        for text, selected, ok, key, unit in checks:
            if not selected:
                continue
            missed = [r for r in selected if not ok(r)]
            status = "met" if not missed else f"MISSED on {len(missed)}/{len(selected)}"
            detail = ", ".join(f"{r['model']}@{r['density']:.2f}: {r[key]:.2f}{unit}" for r in missed[:8])
            lines.append(f"- `{backend}`: {text}: **{status}**" + (f" ({detail})" if detail else ""))
    return lines


def write_model_markdown(path: str, rows: list[dict], meta: dict, command: str) -> None:
    parts = [
        "# Whole training steps of the paper's models", "",
        f"`{command}`", "",
        provenance(meta), "",
        f"Medians of {meta['reps']} interleaved repetitions, with the 20th-80th percentiles (`p20-p80 ms`). "
        "One step = zero_grad + forward + cross entropy + backward + SGD-momentum step, every "
        "sparse layer at the density given (random rows). `vs dense` = t_dense / t; `of static` = t_static / t "
        "(static: every sparse layer cut to its active rows); `FLOPs/dense`: matrix-product FLOPs the "
        "skipping kernels execute over dense's.", "",
        "## Targets", "", *model_targets(rows), "",
        "## All results", "", model_table(rows, markdown=True), "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def plot_models(path: str, rows: list[dict]) -> None:
    """Speed-up over dense against density, one panel per model, the static limit in black."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state

    uniform = [r for r in rows if r["density"] != "profile"]
    models = list(dict.fromkeys(r["model"] for r in uniform))
    candidates = [c for c in dict.fromkeys(r["candidate"] for r in uniform) if c != "dense"]
    fig = Figure(figsize=(3.8 * len(models), 3.4))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for i, candidate in enumerate(candidates):
            pts = [r for r in uniform if r["model"] == model and r["candidate"] == candidate]
            style = {"color": "black", "linewidth": 2} if candidate == "static" else {"color": f"C{i}"}
            ax.plot([r["density"] for r in pts], [r["vs_dense"] for r in pts], marker="o", markersize=3,
                    label=candidate, **style)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_title(f"{model} ({SETUPS[model].ste} STE, batch {SETUPS[model].batch})", fontsize=9)
        ax.set_xlabel("density (active rows, every layer)")
        ax.set_ylabel("training step speed-up over dense")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"whole training step, speed-up over dense ({torch.get_num_threads()} threads)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
