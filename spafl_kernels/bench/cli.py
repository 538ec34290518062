"""``spafl-bench`` (also ``python -m spafl_kernels.bench``): its flags, checked before any timing, and the run."""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from .._version import __version__
from ..backends import BACKEND_NAMES, get_backend
from ..backends.base import CallSpec
from ..semantics import STES
from ..zoo import MODELS
from .layers import (
    BASELINES,
    FULL,
    LAYER_GROUPS,
    LAYERS,
    MODES,
    QUICK,
    default_candidates,
    format_table,
    memory_probe,
    plot,
    run,
    target_lines,
    write_markdown,
)
from .models import DENSITIES as MODEL_DENSITIES
from .models import density_profile, model_table, model_targets, plot_models, run_models, write_model_markdown
from .records import machine, output_problem, provenance, write_outputs
from .timing import CLOCKS


def argument_problems(args: argparse.Namespace, layers: list[str]) -> list[str]:
    """Why the flags cannot make a run (each naming its flag), found before any timing; empty if none.
    (``--threads`` is checked before, as it is applied first.)"""
    problems = []
    if args.reps < 1:
        problems.append(f"--reps must be >= 1 (got {args.reps})")
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        problems.append("--clock thread times the calling thread only: use it with --threads 1 on the CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append(f"--device cuda: CUDA is not available here (torch {torch.__version__})")
    bad = [ste for ste in args.stes if ste not in STES]
    if bad:
        problems.append(f"--ste: unknown {bad}; choose from {list(STES)}")
    ops = sorted({LAYERS[name].op for name in layers if name in LAYERS})
    for name in args.backends or []:
        if name == "dense":
            problems.append("--backends: dense is always timed (it is the baseline); list the others")
        elif name != "masked" and name not in BACKEND_NAMES:
            problems.append(f"--backends: unknown {name!r}; choose from {['masked', *BACKEND_NAMES]}")
        elif name != "masked":
            reasons = [f"{op}: {why}" for op in ops
                       for why in get_backend(name).not_supported_reasons(CallSpec(op, args.device, torch.float32))]
            if reasons:
                problems.append(f"--backends: {name} cannot run here ({'; '.join(reasons)})")
    outputs = {flag: path for flag, path in (("--json", args.json), ("--markdown", args.markdown),
                                             ("--plot", args.plot)) if path}
    for flag, path in outputs.items():
        problem = output_problem(flag, path)
        if problem:
            problems.append(problem)
    same = [flag for flag, path in outputs.items()
            if [os.path.abspath(p) for p in outputs.values()].count(os.path.abspath(path)) > 1]
    if same:
        problems.append(f"{' and '.join(same)} name the same file")
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="spafl-bench",
        description="Time sparse layers against dense (plain PyTorch op) and masked dense (the paper's "
        "code), interleaved, and print median time, speedup over dense and fraction of ideal.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--layers", "--layer", nargs="+", default=None,
                        help=f"layer names or groups {sorted(LAYER_GROUPS)} (default: all); "
                        f"layers: {', '.join(LAYERS)}")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="fractions of active rows (default: 1 0.75 0.5 0.25 0.1 0.05)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="candidates besides dense: 'masked' and backend names (default: masked and every "
                        "backend that runs on the device)")
    parser.add_argument("--ste", "--stes", dest="stes", nargs="+", default=None,
                        help="straight-through estimators (default: outer identity)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="forward only, and/or forward+backward (default: fwd fwd+bwd)")
    parser.add_argument("--forward-only", action="store_true", help="same as --modes fwd")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate (default: 7)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (default: all)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default), or thread: the calling thread's CPU time, which counts no time "
                        "spent waiting for a core (an oversubscribed machine); needs --threads 1 and --device cpu")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of forward+backward on the large layers (one process per "
                        "candidate; CPU, Linux)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI smoke run (under 2 minutes): layers {QUICK['layers']}, densities "
                        f"{QUICK['densities']}, forward+backward, outer STE, {QUICK['reps']} reps; flags given "
                        "explicitly win")
    parser.add_argument("--json", help="write the rows and run metadata to this JSON file")
    parser.add_argument("--markdown", help="write a Markdown report (targets + table) to this file")
    parser.add_argument("--plot", help="draw speedup against density (PNG) to this file (needs matplotlib)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="time whole training steps of these paper models instead of single layers (dense, "
                        "masked dense, the static limit and every backend; densities from --densities, "
                        f"default {list(MODEL_DENSITIES)})")
    parser.add_argument("--density-from", metavar="RUN_DIR",
                        help="with --models: also time the per-layer densities of the last round of this "
                        "spafl-fl run (its model must be among --models)")
    parser.add_argument("--memory-probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1 (got {args.threads})")
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        layer, density, ste, candidate = args.memory_probe
        memory_probe(layer, float(density), ste, candidate)
        return
    explicit_densities = args.densities is not None
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # a flag given explicitly wins over --quick
            setattr(args, key, copy.copy(value))
    if args.forward_only:
        args.modes = ["fwd"]
    layers = list(dict.fromkeys(name for item in args.layers for name in LAYER_GROUPS.get(item, [item])))
    for name in layers:
        if name not in LAYERS:
            parser.error(f"unknown layer {name!r}; choose from {sorted(LAYERS)} or {sorted(LAYER_GROUPS)}")
    for density in args.densities:
        if not 0.0 < density <= 1.0:
            parser.error(f"--densities must lie in (0, 1], got {density}")
    problems = argument_problems(args, layers)
    profiles = {}
    if args.density_from:
        if not args.models:
            problems.append("--density-from needs --models")
        else:
            try:
                model, profile = density_profile(args.density_from)
            except ValueError as error:
                problems.append(str(error))
            else:
                if model not in args.models:
                    problems.append(f"--density-from: that run trained {model!r}; add it to --models")
                profiles[model] = profile
    if problems:
        parser.error("; ".join(problems))
    candidates = list(dict.fromkeys(args.backends)) if args.backends else default_candidates(args.device)
    meta = {**machine(), "reps": args.reps, "device": args.device, "clock": args.clock,
            "command": "spafl-bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.models:
        _main_models(args, candidates, meta, profiles, explicit_densities=explicit_densities)
        return
    print(f"{provenance(meta)}; {args.reps} reps, medians")
    print(format_table([]))
    rows = run(layers, args.densities, candidates, args.stes, args.modes, args.reps, args.device, args.memory,
               progress=lambda line: print(line, flush=True), clock=CLOCKS[args.clock])
    write_outputs(args, rows, meta, write_markdown, plot)
    for backend in sorted(set(candidates) - set(BASELINES)):
        lines = target_lines(rows, backend)
        if lines:
            print(f"\ntargets, {backend} (forward+backward, outer STE):\n" + "\n".join(lines))


def _main_models(args, candidates: list[str], meta: dict, profiles: dict, explicit_densities: bool) -> None:
    """``spafl-bench --models``: whole training steps (``bench.models``)."""
    densities = args.densities if explicit_densities else list(MODEL_DENSITIES)
    print(f"{provenance(meta)}; {args.reps} reps, medians; one training step per model")
    print(model_table([]))
    rows = run_models(args.models, densities, candidates, args.reps, args.device, profiles,
                      progress=lambda line: print(line, flush=True), clock=CLOCKS[args.clock])
    write_outputs(args, rows, meta, write_model_markdown, plot_models)
    print("\nwhole-model targets (docs/DESIGN.md §5):\n" + "\n".join(model_targets(rows)))
