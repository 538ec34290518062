"""Single layers of ``spafl-bench``: sparse backends against dense and masked dense, side by side in one run.

The figure of merit is the fraction of ideal (docs/DESIGN.md §5): ``(t_dense / t_sparse) / ideal_speedup``, where
the ideal speedup is the ratio of dense to skipping FLOPs (``flops.layer_flops``). A run gives one row per layer,
mode, STE, density and candidate; ``write_markdown`` adds the docs/DESIGN.md §5 targets and ``plot`` the speedup
against density with the ideal line.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backends import BACKEND_NAMES, get_backend
from ..backends.base import CallSpec
from ..flops import layer_flops
from ..functional import sparse_conv2d, sparse_linear
from ..paths import used_paths
from ..semantics import fan_in
from .masked import paper_masked
from .records import provenance
from .timing import medians, time_interleaved


@dataclass(frozen=True)
class Layer:
    """A benchmarked layer: op, input and weight shapes, Conv2d geometry, the model it comes from."""

    op: str  # "linear" or "conv2d"
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    model: str
    conv: dict = field(default_factory=dict)


# The paper's models at batch 64: LeNet-5 on 28x28 FMNIST, Conv4 (64-64-128-128 channels, FC
# 256-256) on 32x32 CIFAR-10, ResNet-18 at half width (32-64-128-256) on 32x32 CIFAR-100, and the
# ViT's MLP (dim 128, hidden 256) over 65 tokens (64 patches + class token). Plus docs/DESIGN.md §5's two
# large layers.
LAYERS: dict[str, Layer] = {
    "linear-large": Layer("linear", (256, 4096), (4096, 4096), "large"),
    "conv-large": Layer("conv2d", (64, 64, 32, 32), (128, 64, 3, 3), "large", {"padding": 1}),
    "lenet5-conv1": Layer("conv2d", (64, 1, 28, 28), (6, 1, 5, 5), "lenet5", {"padding": 2}),
    "lenet5-conv2": Layer("conv2d", (64, 6, 14, 14), (16, 6, 5, 5), "lenet5"),
    "lenet5-fc1": Layer("linear", (64, 400), (120, 400), "lenet5"),
    "lenet5-fc2": Layer("linear", (64, 120), (84, 120), "lenet5"),
    "conv4-conv1": Layer("conv2d", (64, 3, 32, 32), (64, 3, 3, 3), "conv4", {"padding": 1}),
    "conv4-conv2": Layer("conv2d", (64, 64, 32, 32), (64, 64, 3, 3), "conv4", {"padding": 1}),
    "conv4-conv3": Layer("conv2d", (64, 64, 16, 16), (128, 64, 3, 3), "conv4", {"padding": 1}),
    "conv4-conv4": Layer("conv2d", (64, 128, 16, 16), (128, 128, 3, 3), "conv4", {"padding": 1}),
    "conv4-fc1": Layer("linear", (64, 8192), (256, 8192), "conv4"),
    "conv4-fc2": Layer("linear", (64, 256), (256, 256), "conv4"),
    "resnet18h-layer1": Layer("conv2d", (64, 32, 32, 32), (32, 32, 3, 3), "resnet18-half", {"padding": 1}),
    "resnet18h-layer2": Layer("conv2d", (64, 64, 16, 16), (64, 64, 3, 3), "resnet18-half", {"padding": 1}),
    "resnet18h-layer3": Layer("conv2d", (64, 128, 8, 8), (128, 128, 3, 3), "resnet18-half", {"padding": 1}),
    "resnet18h-layer4": Layer("conv2d", (64, 256, 4, 4), (256, 256, 3, 3), "resnet18-half", {"padding": 1}),
    "vit-mlp1": Layer("linear", (64 * 65, 128), (256, 128), "vit"),
    "vit-mlp2": Layer("linear", (64 * 65, 256), (128, 256), "vit"),
}
LAYER_GROUPS = {
    "all": list(LAYERS),
    "large": [name for name, layer in LAYERS.items() if layer.model == "large"],
    "paper": [name for name, layer in LAYERS.items() if layer.model != "large"],
}
DENSITIES = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05)
MODES = ("fwd", "fwd+bwd")
BASELINES = ("dense", "masked")  # plain PyTorch op; the paper's masked dense (masked.paper_masked)
FULL = {"layers": ["all"], "densities": list(DENSITIES), "modes": list(MODES), "stes": ["outer", "identity"], "reps": 7}
"""What a run times unless told otherwise (``--quick``: ``QUICK``)."""
QUICK = {
    "layers": ["linear-large", "conv4-conv2", "lenet5-fc1", "vit-mlp1"],
    "densities": [1.0, 0.5, 0.1],
    "modes": ["fwd+bwd"],
    "stes": ["outer"],
    "reps": 5,
}


@dataclass
class Case:
    """One benchmarked layer at one density: inputs, and the FLOP-based ideal speedups."""

    layer: str
    density: float
    ste: str
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    threshold: torch.Tensor
    active: int
    ideal_forward: float
    ideal_train: float


def make_case(layer: str, density: float, ste: str, dtype=torch.float32, device="cpu", seed=0) -> Case:
    """Inputs with ``max(1, round(density * rows))`` active rows; pruned rows get scores in
    (-0.75, -0.25), i.e. gate closed under ``outer``, open under ``identity``/``clipped``."""
    spec = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.x_shape, generator=g).to(device, dtype)
    weight = torch.randn(spec.w_shape, generator=g) / fan_in(torch.empty(spec.w_shape, device="meta")) ** 0.5
    rows = spec.w_shape[0]
    active = max(1, round(density * rows))
    score = -torch.rand(rows, generator=g) * 0.5 - 0.25
    score[torch.randperm(rows, generator=g)[:active]] = 0.5
    threshold = weight.abs().reshape(rows, -1).mean(1) - score
    if spec.op == "linear":
        positions = spec.x_shape[0]
    else:
        out_hw = F.conv2d(torch.empty(1, *spec.x_shape[1:], device="meta"), weight.to("meta"), **spec.conv).shape[2:]
        positions = spec.x_shape[0] * out_hw[0] * out_hw[1]
    open_pruned = 0 if ste == "outer" else rows - active
    flops = layer_flops(positions, fan_in(weight), rows, active, open_pruned, need_dx=True)
    return Case(
        layer, density, ste, x, weight.to(device, dtype), torch.zeros(rows, device=device, dtype=dtype),
        threshold.to(device, dtype), active,
        ideal_forward=flops.dense_forward / max(flops.forward, 1),
        ideal_train=flops.dense_train / max(flops.train, 1),
    )


def make_step(case: Case, candidate: str, train: bool) -> Callable[[], None]:
    """A no-argument function running one forward (and backward when ``train``) of ``candidate``:
    ``dense``, ``masked`` (the paper's masked dense, ``masked.paper_masked``) or a backend name. Gradients
    accumulate into ``.grad`` as in training with accumulation, so a candidate pays for every element of the
    gradients it returns."""
    spec = LAYERS[case.layer]
    leaves = [t.detach().clone().requires_grad_(train) for t in (case.x, case.weight, case.bias, case.threshold)]
    x, weight, bias, threshold = leaves
    conv = None if spec.op == "linear" else spec.conv

    def forward():
        if candidate == "masked":
            return paper_masked(x, weight, bias, threshold, case.ste, conv)
        if conv is None:
            if candidate == "dense":
                return F.linear(x, weight, bias)
            return sparse_linear(x, weight, bias, threshold, ste=case.ste, backend=candidate)
        if candidate == "dense":
            return F.conv2d(x, weight, bias, **conv)
        return sparse_conv2d(x, weight, bias, threshold, ste=case.ste, backend=candidate, **conv)

    grad = torch.ones_like(forward()) if train else None

    def step():
        if train:
            forward().backward(grad)
        else:
            with torch.no_grad():
                forward()

    return step


def peak_rss_delta(layer: str, density: float, ste: str, candidate: str) -> int:
    """Peak resident memory (bytes) one forward+backward of ``candidate`` adds over the memory it
    starts from (median of 5 steps after two warm-up steps), measured in a fresh process (Linux
    ``VmHWM``)."""
    command = [sys.executable, "-m", "spafl_kernels.bench", "--memory-probe", layer, str(density), ste, candidate]
    # glibc maps every block of 64 KiB or more afresh and unmaps it when freed, so the resident size
    # follows the live tensors instead of the heap's history (which varies by tens of MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def memory_probe(layer: str, density: float, ste: str, candidate: str) -> None:
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    step = make_step(make_case(layer, density, ste), candidate, train=True)
    step()
    step()
    peaks = []
    for _ in range(5):
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
            f.write("5")
        before = status("VmRSS:")
        step()
        peaks.append(status("VmHWM:") - before)
    print(int(statistics.median(peaks)))


def default_candidates(device: str) -> list[str]:
    """``masked`` and every kernel backend that can run float32 Linear on ``device``."""
    spec = CallSpec("linear", device, torch.float32)
    kernels = [n for n in BACKEND_NAMES if n != "reference"]
    return ["masked"] + [n for n in kernels if not get_backend(n).not_supported_reasons(spec)]


def run(
    layers: Sequence[str], densities: Sequence[float], candidates: Sequence[str], stes: Sequence[str],
    modes: Sequence[str], reps: int, device: str = "cpu", memory: bool = False,
    progress: Callable[[str], None] = lambda line: None, clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """One row per (layer, mode, ste, density, candidate): median seconds, speedup over dense,
    fraction of ideal, and with ``memory`` the peak memory of forward+backward of the large layers
    (also for dense; small layers' peaks are lost in allocator granularity)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for layer in layers:
        for mode in modes:
            train = mode == "fwd+bwd"
            for ste in stes:
                for density in densities:
                    case = make_case(layer, density, ste, device=device)
                    steps = {name: make_step(case, name, train) for name in ("dense", *candidates)}
                    timings = time_interleaved(steps, reps, sync=sync, clock=clock)
                    times = medians(timings)
                    del steps
                    ideal = case.ideal_train if train else case.ideal_forward
                    peaks = {}
                    if memory and train and device == "cpu" and LAYERS[layer].model == "large":
                        peaks = {name: peak_rss_delta(layer, density, ste, name) for name in ("dense", *candidates)}
                    for name in candidates:
                        speedup = times["dense"] / times[name]
                        row = {
                            "layer": layer, "model": LAYERS[layer].model, "op": LAYERS[layer].op, "mode": mode,
                            "ste": ste, "density": density, "active": case.active,
                            "rows": LAYERS[layer].w_shape[0], "backend": name, "seconds": times[name],
                            "p20_seconds": timings[name]["p20"], "p80_seconds": timings[name]["p80"],
                            "dense_seconds": times["dense"], "dense_p20_seconds": timings["dense"]["p20"],
                            "dense_p80_seconds": timings["dense"]["p80"], "speedup": speedup, "ideal": ideal,
                            "fraction_of_ideal": speedup / ideal,
                        }
                        if name == "cpp":  # which exact path its calls took (spafl_kernels.paths)
                            layer_def = LAYERS[layer]
                            row["path"] = used_paths(layer_def.op, layer_def.x_shape, layer_def.w_shape, case.active)
                        if peaks:
                            row["peak_bytes"], row["dense_peak_bytes"] = peaks[name], peaks["dense"]
                        rows.append(row)
                        progress(format_row(row))
    return rows


_COLUMNS = [
    # (header, width, formatter)
    ("layer", 17, lambda r: r["layer"]),
    ("mode", 8, lambda r: r["mode"]),
    ("ste", 9, lambda r: r["ste"]),
    ("density", 8, lambda r: f"{r['density']:.2f}"),
    ("active", 10, lambda r: f"{r['active']}/{r['rows']}"),
    ("backend", 8, lambda r: r["backend"]),
    ("median ms", 10, lambda r: f"{r['seconds'] * 1e3:.3f}"),
    ("p20-p80 ms", 16, lambda r: spread_text(r, "")),
    ("dense p20-p80", 16, lambda r: spread_text(r, "dense_")),
    ("vs dense", 9, lambda r: f"{r['speedup']:.2f}x"),
    ("ideal", 7, lambda r: f"{r['ideal']:.2f}x"),
    ("of ideal", 9, lambda r: f"{r['fraction_of_ideal']:.2f}"),
    ("cpp path", 22, lambda r: r.get("path", "")),
    ("peak MiB", 13, lambda r: f"{r['peak_bytes'] / 2**20:.0f} ({r['dense_peak_bytes'] / 2**20:.0f})"
     if "peak_bytes" in r else ""),
]


def spread_text(row: dict, prefix: str) -> str:
    """``"p20-p80"`` in ms of the candidate (``prefix=""``) or of dense (``"dense_"``); empty in older records."""
    if f"{prefix}p20_seconds" not in row:
        return ""
    return f"{row[f'{prefix}p20_seconds'] * 1e3:.3f}-{row[f'{prefix}p80_seconds'] * 1e3:.3f}"


def format_row(row: dict) -> str:
    return "".join(f"{fmt(row):>{width}} " for _, width, fmt in _COLUMNS).rstrip()


def format_table(rows: list[dict]) -> str:
    """Console table; ``peak MiB`` is the candidate's peak (dense's in parentheses)."""
    header = "".join(f"{name:>{width}} " for name, width, _ in _COLUMNS).rstrip()
    return "\n".join([header, "-" * len(header), *(format_row(r) for r in rows)])


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(fmt(r) for _, _, fmt in _COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def target_lines(rows: list[dict], backend: str) -> list[str]:
    """Where ``backend`` stands against docs/DESIGN.md §5 targets (forward+backward, ``outer`` STE)."""
    train = [r for r in rows if r["mode"] == "fwd+bwd" and r["ste"] == "outer"]
    mine = [r for r in train if r["backend"] == backend]
    lines = []
    for r in (r for r in mine if r["model"] == "large"):
        goal = {0.5: 0.85, 0.25: 0.75, 0.1: 0.6}.get(r["density"])
        if r["density"] == 1.0:
            lines.append(f"- {r['layer']} density 1: {r['speedup']:.2f}x dense (target >= 0.97x): "
                         + ("met" if r["speedup"] >= 0.97 else "MISSED"))
        elif goal is not None:
            lines.append(f"- {r['layer']} density {r['density']}: {r['fraction_of_ideal']:.2f} of ideal "
                         f"(target >= {goal}): " + ("met" if r["fraction_of_ideal"] >= goal else "MISSED"))
    paper = [r for r in mine if r["model"] != "large"]
    if paper:
        slow = [r for r in paper if r["speedup"] < 1.0]
        lines.append(f"- paper-model layers never slower than dense: {len(paper) - len(slow)}/{len(paper)} cases met"
                     + "".join(f"; {r['layer']}@{r['density']} {r['speedup']:.2f}x" for r in slow))
        torch_rows = {(r["layer"], r["density"]): r for r in train if r["backend"] == "torch"}
        versus = [(r, torch_rows[(r["layer"], r["density"])]) for r in paper
                  if r["density"] <= 0.5 and (r["layer"], r["density"]) in torch_rows]
        behind = [(r, t) for r, t in versus if r["seconds"] >= t["seconds"]]
        if versus and backend != "torch":
            lines.append(f"- paper-model layers faster than torch at density <= 0.5: {len(versus) - len(behind)}/"
                         f"{len(versus)} cases met" + "".join(
                             f"; {r['layer']}@{r['density']} {t['seconds'] / r['seconds']:.2f}x torch"
                             for r, t in behind))
    with_memory = [r for r in mine if "peak_bytes" in r]
    if with_memory:
        over = [r for r in with_memory if r["peak_bytes"] > r["dense_peak_bytes"]]
        lines.append(f"- peak memory no higher than dense: {len(with_memory) - len(over)}/{len(with_memory)} cases met"
                     + "".join(f"; {r['layer']}@{r['density']} {r['peak_bytes'] / 2**20:.0f} MiB vs "
                               f"{r['dense_peak_bytes'] / 2**20:.0f}" for r in over))
    return lines


def write_markdown(path: str, rows: list[dict], meta: dict, command: str) -> None:
    backends = sorted({r["backend"] for r in rows} - set(BASELINES))
    parts = [
        "# Sparse layers against dense", "",
        f"`{command}`", "",
        provenance(meta), "",
        f"Medians of {meta['reps']} interleaved repetitions, with the 20th-80th percentiles (`p20-p80 ms`, dense's "
        "beside). `vs dense` = t_dense / t; `of ideal` = (t_dense / t) / (dense FLOPs / skipping FLOPs); "
        "`peak MiB` = peak resident memory a forward+backward adds (dense's in parentheses).", "",
    ]
    for backend in backends:
        lines = target_lines(rows, backend)
        if lines:
            parts += [f"## Targets: `{backend}` (forward+backward, outer STE)", "", *lines, ""]
    parts += ["## All results", "", markdown_table(rows), ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def plot(path: str, rows: list[dict]) -> None:
    """Speedup over dense against density, one panel per layer: solid = forward+backward, dotted =
    forward; black = the ideal. Uses the first STE in ``rows``."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state

    ste = rows[0]["ste"]
    rows = [r for r in rows if r["ste"] == ste]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cols = min(4, len(layers))
    grid = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * grid))
    axes = fig.subplots(grid, cols, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for mode, style in (("fwd+bwd", "-"), ("fwd", ":")):
            sel = [r for r in rows if r["layer"] == layer and r["mode"] == mode]
            if not sel:
                continue
            first = [r for r in sel if r["backend"] == backends[0]]
            ax.plot([r["active"] / r["rows"] for r in first], [r["ideal"] for r in first], style, color="black",
                    label=f"ideal {mode}")
            for i, backend in enumerate(backends):
                pts = [r for r in sel if r["backend"] == backend]
                ax.plot([r["active"] / r["rows"] for r in pts], [r["speedup"] for r in pts], style, marker="o",
                        markersize=3, color=f"C{i}", label=f"{backend} {mode}")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("density (active rows)")
        ax.set_ylabel("speedup over dense")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(f"speedup over dense (STE {ste}, {torch.get_num_threads()} threads)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
