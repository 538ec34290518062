"""``spafl-fl``: ``run`` a federated experiment, ``compare`` finished runs.

    spafl-fl run --dataset mnist5k --model lenet5 --rounds 30 --out runs/spafl
    spafl-fl run --algorithm fedavg --out runs/fedavg
    spafl-fl run --backend reference --out runs/masked-dense
    spafl-fl run --algorithm local --out runs/local
    spafl-fl run --preset fmnist-lenet5 --dataset mnist5k --rounds 30 --out runs/paper   (flags given win)
    spafl-fl compare runs/spafl runs/fedavg runs/local runs/masked-dense --plots runs/compare
    spafl-fl reproduce --out runs/reproduce   (SpaFL vs FedAvg vs Local vs masked dense, one Markdown page)
    spafl-fl flower --dataset mnist5k --model lenet5 --rounds 30 --out runs/flower   (pip install .[flower])
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from spafl_kernels import BACKEND_NAMES, STES

from .config import ALGORITHMS, GLOBAL_UPDATES, PRESETS, RunConfig
from .data import DATASETS
from .models import MODELS

_D = RunConfig()


_RUN_HELP = "run SpaFL, FedAvg or Local and write config.json, metrics.jsonl, summary.json, plots"


def _run_parser(sub, command: str = "run", help_text: str = _RUN_HELP) -> argparse.ArgumentParser:
    """The ``run`` subcommand's flags, for ``run`` and for ``flower`` (same flags, another engine)."""
    p = sub.add_parser(command, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--algorithm", choices=ALGORITHMS, default=_D.algorithm)
    add("--dataset", choices=DATASETS, default=_D.dataset)
    add("--data-dir", default=_D.data_dir, help="folder with the fmnist IDX or CIFAR-10 binary files")
    add("--model", choices=MODELS, default=_D.model)
    add("--clients", type=int, default=_D.clients, help="number of clients")
    add("--sample", type=int, default=_D.sample, help="clients sampled per round")
    add("--rounds", type=int, default=_D.rounds)
    add("--local-epochs", type=int, default=_D.local_epochs)
    add("--batch-size", type=int, default=_D.batch_size)
    add("--lr", type=float, default=_D.lr)
    add("--lr-decay", type=float, default=_D.lr_decay, help="lr of round r = lr * lr_decay**r")
    add("--momentum", type=float, default=_D.momentum)
    add("--weight-decay", type=float, default=_D.weight_decay)
    add("--clip", type=float, default=_D.clip, help="max gradient norm (0: off)")
    add("--th-coeff", type=float, default=_D.th_coeff, help="weight of sum(exp(-threshold)) in the loss")
    add("--th-warmup", type=int, default=_D.th_warmup, help="rounds of sigmoid warm-up of th-coeff (0: off)")
    add("--alpha", type=float, default=_D.alpha, help="Dirichlet concentration of the non-IID split")
    add("--test-fraction", type=float, default=_D.test_fraction,
        help="per-client test share (datasets without an official test set)")
    add("--ste", choices=STES, default=_D.ste)
    add("--backend", choices=("auto", *BACKEND_NAMES), default=_D.backend,
        help="sparse-layer backend; 'reference' is the masked-dense baseline")
    add("--min-density", type=float, default=_D.min_density, help="layer-collapse guard of reset_collapsed")
    add("--seed", type=int, default=_D.seed)
    add("--device", default=_D.device)
    add("--threads", type=int, default=_D.threads, help="torch threads (0: torch's default)")
    add("--no-baseline", action="store_true", help="do not replay client training with backend=reference")
    add("--out", required=True, metavar="DIR")
    add("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--global-update", choices=GLOBAL_UPDATES, default=_D.global_update,
        help="lazy: a client applies the global threshold change when next sampled (the authors' FMNIST "
        "code); eager: every client after every round (their CIFAR code)")
    add("--input-scale", type=float, default=_D.input_scale,
        help="multiply the [0, 1] images by this (255: the raw pixels the authors trained on)")
    add("--preset", choices=tuple(PRESETS), default=None,
        help="the paper's setting for this experiment; flags given on the command line override it")
    return p


def apply_preset(sub_parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` again with the chosen preset's values as the defaults of ``sub_parser``, so
    that every flag given explicitly still wins."""
    first = sub_parser.parse_known_args(argv)[0]
    sub_parser.set_defaults(**PRESETS[first.preset])
    return sub_parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        algorithm=args.algorithm, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
        clients=args.clients, sample=args.sample, rounds=args.rounds, local_epochs=args.local_epochs,
        batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, momentum=args.momentum,
        weight_decay=args.weight_decay, clip=args.clip, th_coeff=args.th_coeff, th_warmup=args.th_warmup,
        alpha=args.alpha, test_fraction=args.test_fraction, ste=args.ste, backend=args.backend,
        min_density=args.min_density, seed=args.seed, device=args.device, threads=args.threads,
        measure_baseline=not args.no_baseline, global_update=args.global_update, input_scale=args.input_scale,
        preset=args.preset,
    )


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def savings_report(summary: dict, config: dict) -> str:
    """The run's savings in a few lines: accuracy, density, bits vs FedAvg, FLOPs vs dense, time vs masked dense."""
    compute = f"backend {config['resolved_backend']}" if config.get("resolved_backend") else "dense layers"
    lines = [f"{summary['algorithm']} on {config['dataset']} with {config['model']}: {summary['rounds']} rounds, "
             f"{config['clients']} clients ({config['sample']} per round), {compute}"]
    if summary["accuracy"] is None:
        return lines[0] + "\n  (no rounds run)"
    lines.append(f"  accuracy        {summary['accuracy']:.2f} % (mean of the clients' own test splits)")
    lines.append(f"  density         {summary['density']:.3f} weight density (fraction of sparse-layer weights in "
                 "active rows)")
    if summary.get("mean_row_density") is not None:
        lines.append(f"                  {summary['mean_row_density']:.3f} mean row density (mean over layers of the "
                     "fraction of active rows: the authors' 'density')")
    wire = summary["uplink_bits"] + summary["downlink_bits"]
    fedavg = 2 * summary["dense_uplink_bits"]  # FedAvg: the full state down to and up from each sampled client
    bits = f"  bits on wire    up {_si(summary['uplink_bits'], 'b')} + down {_si(summary['downlink_bits'], 'b')}"
    if summary["algorithm"] != "fedavg" and wire:
        bits += f" vs FedAvg (same model and rounds) {_si(fedavg, 'b')}: {fedavg / wire:.3g}x fewer"
    lines.append(bits)
    lines.append(f"  train FLOPs     executed {_si(summary['train_flops'])} vs dense "
                 f"{_si(summary['dense_train_flops'])} ({summary['train_flops'] / summary['dense_train_flops']:.3f}x);"
                 " paper formula "
                 f"{_si(summary['paper_train_flops'])}")
    if summary.get("authors_flops_per_client"):
        lines.append(f"  authors' FLOPs  {_si(summary['authors_flops_per_client'])} per client (their count: 1 per "
                     "multiply-add, end-of-round density for the whole round, averaged over all clients)")
    base = summary["baseline_train_seconds"]
    time_line = f"  train time      {summary['train_seconds']:.2f} s"
    if base:
        speedup = base / summary["train_seconds"]
        verdict = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        time_line += f" vs {base:.2f} s masked dense (reference) on the same batches: {verdict} (measured)"
    lines.append(time_line)
    return "\n".join(lines)


def _load_run(folder: str) -> tuple[dict, dict, list[dict]]:
    paths = {name: os.path.join(folder, name) for name in ("summary.json", "config.json", "metrics.jsonl")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder} is not a finished run: missing {missing}")
    with open(paths["summary.json"]) as f:
        summary = json.load(f)
    with open(paths["config.json"]) as f:
        config = json.load(f)
    with open(paths["metrics.jsonl"]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return summary, config, records


def compare_table(runs: list[tuple[str, dict, dict]]) -> str:
    """One row per run (folder, summary, config)."""
    header = ["run", "algorithm", "backend", "data/model", "rounds", "acc %", "density", "row density",
              "wire bits", "FedAvg bits", "train FLOPs", "dense FLOPs", "authors FLOPs/client", "train s",
              "masked-dense s"]
    rows = [header]
    for folder, s, c in runs:
        rows.append([
            folder, s["algorithm"], str(c.get("resolved_backend") or "dense"), f"{c['dataset']}/{c['model']}",
            str(s["rounds"]), "-" if s["accuracy"] is None else f"{s['accuracy']:.2f}",
            "-" if s["density"] is None else f"{s['density']:.3f}",
            "-" if s.get("mean_row_density") is None else f"{s['mean_row_density']:.3f}",
            _si(s["uplink_bits"] + s["downlink_bits"]), _si(2 * s["dense_uplink_bits"]),
            _si(s["train_flops"]), _si(s["dense_train_flops"]), _si(s.get("authors_flops_per_client")),
            f"{s['train_seconds']:.2f}",
            "-" if s["baseline_train_seconds"] is None else f"{s['baseline_train_seconds']:.2f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spafl-fl", description="SpaFL federated learning on sparse kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parsers = {"run": _run_parser(sub),
                   "flower": _run_parser(sub, "flower", "run SpaFL on Flower's simulation engine (Ray); writes the "
                                         "files of `run` (needs pip install .[flower])")}
    cp = sub.add_parser("compare", help="print one table over finished runs")
    cp.add_argument("dirs", nargs="+", metavar="DIR")
    cp.add_argument("--plots", metavar="OUT", help="also write the comparison plots into OUT")
    from .reproduce import add_reproduce_parser, reproduce

    add_reproduce_parser(sub)
    args = parser.parse_args(argv)
    if args.command in run_parsers and args.preset:
        command = args.command  # the subcommand is the first word: the rest are its flags
        args = apply_preset(run_parsers[command], (sys.argv[1:] if argv is None else argv)[1:])
        args.command = command

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "compare":
        loaded = [(d, *_load_run(d)) for d in args.dirs]
        print(compare_table([(d, s, c) for d, s, c, _ in loaded]))
        if args.plots:
            from .plots import plot_runs

            os.makedirs(args.plots, exist_ok=True)
            for path in plot_runs([(d, records) for d, _, _, records in loaded], args.plots):
                print(f"wrote {path}")
        return 0

    if args.command == "flower":
        return _flower(parser, args)
    if args.command == "reproduce":
        return reproduce(parser, args)

    from .simulation import Simulation

    try:
        config = config_from_args(args)
        os.makedirs(args.out, exist_ok=True)
        handler = logging.FileHandler(os.path.join(args.out, "run.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("spafl_fl").addHandler(handler)
        simulation = Simulation(config, args.out, resume=args.resume)
    except (ValueError, OSError, RuntimeError) as error:
        # A setup problem (flags, missing data files, an occupied --out) is the user's to fix: no traceback.
        parser.error(str(error))
    summary = simulation.run(progress=not args.no_progress)
    print(savings_report(summary, simulation.describe()))
    print(f"results in {args.out}: config.json, metrics.jsonl, summary.json, accuracy/density/bits/time .png")
    return 0


def _flower(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``spafl-fl flower``: the same run on Flower's simulation engine, one virtual SuperNode per client."""
    try:
        config = config_from_args(args)
        if config.algorithm == "fedavg":
            raise ValueError("spafl-fl flower runs SpaFL and Local; FedAvg runs on Flower's own FedAvg strategy")
        if args.resume:
            raise ValueError("spafl-fl flower does not resume (no checkpoints); start a new --out")
        from .flower import SpaFLStrategy, run_flower_simulation

        os.makedirs(args.out, exist_ok=True)
        if os.path.exists(os.path.join(args.out, "metrics.jsonl")):
            raise FileExistsError(f"{args.out} already holds a run; choose another --out")
    except ImportError as error:
        parser.error(f"{error}: install the Flower extra, pip install --no-build-isolation '.[flower]'")
    except (ValueError, OSError, RuntimeError) as error:
        parser.error(str(error))
    handler = logging.FileHandler(os.path.join(args.out, "run.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("spafl_fl").addHandler(handler)
    strategy: SpaFLStrategy = run_flower_simulation(config, args.out)
    print(savings_report(strategy.finish_summary, strategy.description))
    print(f"results in {args.out}: config.json, metrics.jsonl, summary.json, accuracy/density/bits/time .png")
    return 0
