"""Where a small layer's time goes: one call taken apart against the plain PyTorch op, and a whole
training step's operators against the static limit.

    python benchmarks/profile_calls.py --layers lenet5-fc1-b32 authors-fc3 --densities 1 \
        --step mlp:0.1 --markdown out.md

Per layer (forward, no autograd, one thread, thread clock, interleaved medians), each stage adds one thing
to the previous one:

- ``dense op``: ``F.linear`` / ``F.conv2d``;
- ``score pass``: the native forward op with every row pruned (dispatch, the score pass over W, a zero output;
  no product);
- ``native fwd op``: ``torch.ops.spafl.native_<op>_fwd`` at the case's density (the product on the path the
  choice table holds);
- ``autograd node``: ``torch.ops.spafl.native_<op>``, the C++ autograd node eager calls use;
- ``functional``: ``sparse_linear`` / ``sparse_conv2d`` with ``backend="cpp"`` (the checks' cache, the
  threshold check, the op lookup);
- ``module`` against ``dense module``: ``SparseLinear``/``SparseConv2d`` (``backend="auto"``) against the
  ``nn.Linear``/``nn.Conv2d`` it replaces.

``--step MODEL:DENSITY`` profiles one training step of a paper model (``spafl_kernels.bench.models``: the
``cpp`` model against the static limit) with ``torch.profiler``: the operators whose self time differs most.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from spafl_kernels import functional
from spafl_kernels.bench import layers, models, records, timing
from spafl_kernels.modules import SparseConv2d, SparseLinear

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from paths_ab import AUTHORS  # noqa: E402  (the authors' LeNet-5 layers, named as paths_ab names them)

STAGES = ("dense op", "score pass", "native fwd op", "autograd node", "functional", "dense module", "module")


def layer_stages(layer: str, density: float) -> dict[str, object]:
    """One no-argument forward per stage (``STAGES``) of ``layer`` at ``density``."""
    case = layers.make_case(layer, density, "identity")
    spec = layers.LAYERS[layer]
    x, w, b, th = case.x, case.weight, case.bias, case.threshold
    pruned = torch.full_like(th, float(torch.finfo(th.dtype).max))
    if spec.op == "linear":
        fwd, node = torch.ops.spafl.native_linear_fwd.default, torch.ops.spafl.native_linear.default
        dense = nn.Linear(w.shape[1], w.shape[0])
        sparse = SparseLinear.from_dense(dense)
        return {
            "dense op": lambda: F.linear(x, w, b), "score pass": lambda: fwd(x, w, b, pruned),
            "native fwd op": lambda: fwd(x, w, b, th), "autograd node": lambda: node(x, w, b, th, 0),
            "functional": lambda: functional.sparse_linear(x, w, b, th, backend="cpp"),
            **_modules(dense, sparse, w, b, th, x),
        }
    conv = spec.conv
    _, geometry, _ = functional._check_conv2d(x, w, b, th, conv.get("stride", 1), conv.get("padding", 0),
                                              conv.get("dilation", 1), conv.get("groups", 1), "identity", "cpp")
    geometry = list(geometry)
    fwd, node = torch.ops.spafl.native_conv2d_fwd.default, torch.ops.spafl.native_conv2d.default
    dense = nn.Conv2d(w.shape[1] * conv.get("groups", 1), w.shape[0], tuple(w.shape[2:]), **conv)
    sparse = SparseConv2d.from_dense(dense)
    return {
        "dense op": lambda: F.conv2d(x, w, b, **conv), "score pass": lambda: fwd(x, w, b, pruned, geometry),
        "native fwd op": lambda: fwd(x, w, b, th, geometry), "autograd node": lambda: node(x, w, b, th, geometry, 0),
        "functional": lambda: functional.sparse_conv2d(x, w, b, th, backend="cpp", **conv),
        **_modules(dense, sparse, w, b, th, x),
    }


def _modules(dense: nn.Module, sparse: nn.Module, w, b, th, x) -> dict[str, object]:
    with torch.no_grad():
        for module in (dense, sparse):
            module.weight.copy_(w)
            module.bias.copy_(b)
        sparse.threshold.copy_(th)
    return {"dense module": lambda: dense(x), "module": lambda: sparse(x)}


def profile_layer(layer: str, density: float, reps: int) -> dict:
    with torch.no_grad():
        samples = timing.time_interleaved(layer_stages(layer, density), reps, clock=time.thread_time)
    us = {name: t["p50"] * 1e6 for name, t in samples.items()}
    return {"layer": layer, "density": density, "us": us}


def profile_step(model: str, density: float, steps: int = 50, rows: int = 12) -> str:
    """``torch.profiler`` self CPU time per step of the ``cpp`` model and of the static limit, by operator:
    the ``rows`` operators whose difference is largest, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    setup = models.SETUPS[model]
    sparse = models.build_model(model, setup.input_shape, setup.num_classes, ste=setup.ste, backend="cpp", seed=0)
    models.set_densities(sparse, density)
    static = models.static_model(sparse)
    x = torch.randn(setup.batch, *setup.input_shape, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, setup.num_classes, (setup.batch,), generator=torch.Generator().manual_seed(1))
    per_op: dict[str, dict[str, float]] = {}
    totals = {}
    for name, net in (("cpp", sparse), ("static", static)):
        step = models.training_step(net, x, target)
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        totals[name] = sum(e.self_cpu_time_total for e in events) / steps
        for e in events:
            per_op.setdefault(e.key, {"cpp": 0.0, "static": 0.0})[name] = e.self_cpu_time_total / steps
    ranked = sorted(per_op.items(), key=lambda kv: -abs(kv[1]["cpp"] - kv[1]["static"]))[:rows]
    lines = [f"`{model}` at density {density}, batch {setup.batch}: self CPU us per training step "
             f"(torch.profiler, {steps} steps, 1 thread); totals: cpp {totals['cpp']:.0f} us, static "
             f"{totals['static']:.0f} us.", "", "| operator | cpp | static | cpp - static |", "|---|---|---|---|"]
    for key, t in ranked:
        lines.append(f"| `{key}` | {t['cpp']:.0f} | {t['static']:.0f} | {t['cpp'] - t['static']:+.0f} |")
    return "\n".join(lines) + "\n"


def layer_markdown(rows: list[dict], reps: int) -> str:
    lines = [f"Median us per forward call (no autograd), {reps} interleaved reps, 1 thread, thread clock; "
             "each stage adds one thing to the one before (module: against the dense module).", "",
             "| layer | density | " + " | ".join(STAGES) + " | module / dense module |",
             "|" + "---|" * (len(STAGES) + 3)]
    for r in rows:
        us = r["us"]
        lines.append(f"| {r['layer']} | {r['density']:.2f} | " + " | ".join(f"{us[s]:.1f}" for s in STAGES)
                     + f" | {us['dense module'] / us['module']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=["lenet5-fc1-b32", "lenet5-conv1-b32", "authors-fc3",
                                                        "authors-conv1"])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--step", nargs="*", default=["mlp:0.1"], metavar="MODEL:DENSITY",
                        help="training steps to profile operator by operator (none: skip)")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers.LAYERS.update(AUTHORS)
    rows = []
    for layer in args.layers:
        for density in args.densities:
            rows.append(profile_layer(layer, density, args.reps))
            print(f"{layer:<16} {density:.2f} " + "  ".join(f"{s} {rows[-1]['us'][s]:.1f}" for s in STAGES),
                  flush=True)
    parts = [f"`python benchmarks/profile_calls.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             records.provenance(records.machine()), "", layer_markdown(rows, args.reps)]
    for spec in args.step:
        model, density = spec.split(":")
        parts.append(profile_step(model, float(density)))
        print(parts[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(parts))


if __name__ == "__main__":
    main()
