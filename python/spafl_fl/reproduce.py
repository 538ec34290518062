"""``spafl-fl reproduce``: SpaFL against FedAvg, Local and masked-dense SpaFL with the paper's closest
preset, on the data that ship offline (``mnist5k``, ``digits``) and on ``--data-dir`` copies of
Fashion-MNIST or CIFAR-10, written up as one Markdown page (``report.md``) with its plots.

Every run lives in ``OUT/runs/<dataset>/<variant>`` with the usual files; a run that already finished
there is read back, one that stopped is resumed, so an interrupted reproduction picks up where it
was. The page and its plots (``OUT/plots/<dataset>/*.png``) are all that need keeping.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .checkpoint import atomic_write_text
from .config import PRESETS, RunConfig, threads_problems
from .results import load_run, si

DATASET_PRESET = {"mnist5k": "fmnist-lenet5", "digits": "fmnist-lenet5", "fmnist": "fmnist-lenet5",
                  "cifar10": "cifar10-conv4"}
"""The paper's setting closest to each dataset (grayscale digits and clothes: FMNIST/LeNet-5)."""

VARIANTS = (
    ("spafl", "SpaFL (lazy update)", {}),
    ("spafl-eager", "SpaFL (eager update)", {"global_update": "eager", "measure_baseline": False}),
    ("spafl-masked-dense", "SpaFL, masked dense (backend reference)", {"backend": "reference",
                                                                       "measure_baseline": False}),
    ("fedavg", "FedAvg (dense)", {"algorithm": "fedavg"}),
    ("local", "Local (dense, nothing sent)", {"algorithm": "local"}),
)
"""(folder, label, overrides of the preset) of every run per dataset."""

BIT_TARGET = 700.0

BITS_VARIANTS = (("lazy", "SpaFL (lazy update)"), ("eager", "SpaFL (eager update)"))
"""The bits check: LeNet-5 at the paper's 100 clients / 10 per round, both update variants."""


def add_reproduce_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="SpaFL vs FedAvg vs Local vs masked dense with the paper's presets; "
                       "writes OUT/report.md with the table and plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--out", required=True, metavar="DIR", help="new or empty folder, unless --resume or --overwrite")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the reproduction in DIR: finished runs are read back, stopped ones resumed, "
                      "the page rewritten")
    once.add_argument("--overwrite", action="store_true",
                      help="start the reproduction in DIR over: replaces only what a previous reproduce wrote")
    add("--datasets", nargs="+", default=["mnist5k", "digits"], choices=tuple(DATASET_PRESET),
        help="fmnist and cifar10 need --data-dir")
    add("--data-dir", default=None, help="folder with the Fashion-MNIST IDX or CIFAR-10 binary files")
    add("--rounds", type=int, default=40, help="rounds per run (the paper: 500 for FMNIST)")
    add("--clients", type=int, default=None, help="clients (None: the preset's 100)")
    add("--sample", type=int, default=None, help="clients per round (None: the preset's 10)")
    add("--local-epochs", type=int, default=None, help="local epochs (None: the preset's)")
    add("--lr", type=float, default=None, help="learning rate (None: the preset's)")
    add("--th-coeff", type=float, default=None, help="th_coeff (None: the preset's)")
    add("--input-scale", type=float, default=255.0,
        help="multiply the [0, 1] images by this; 255 gives the raw pixels the presets were tuned on")
    add("--bits-rounds", type=int, default=3,
        help="rounds of the bits check (LeNet-5, 100 clients, 10 per round, on the first dataset; 0: skip)")
    add("--seed", type=int, default=1)
    add("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    add("--no-progress", action="store_true")


def _overrides(args: argparse.Namespace) -> dict:
    given = {"clients": args.clients, "sample": args.sample, "local_epochs": args.local_epochs, "lr": args.lr,
             "th_coeff": args.th_coeff}
    return {k: v for k, v in given.items() if v is not None}


def run_configs(args: argparse.Namespace) -> list[tuple[str, str, str, RunConfig]]:
    """``(dataset, folder, label, config)`` of every run of the reproduction."""
    runs = []
    for dataset in args.datasets:
        preset = DATASET_PRESET[dataset]
        for folder, label, extra in VARIANTS:
            config = RunConfig.from_preset(preset, dataset=dataset, data_dir=args.data_dir, rounds=args.rounds,
                                           input_scale=args.input_scale, seed=args.seed, threads=args.threads,
                                           **_overrides(args), **extra)
            runs.append((dataset, folder, label, config))
    return runs


def bits_configs(args: argparse.Namespace) -> list[tuple[str, str, RunConfig]]:
    """``(variant, label, config)`` of the bits check: the preset's clients and sampling, few rounds."""
    if args.bits_rounds <= 0:
        return []
    dataset = args.datasets[0]
    return [(update, label, RunConfig.from_preset(
        "fmnist-lenet5", dataset=dataset, data_dir=args.data_dir, rounds=args.bits_rounds,
        input_scale=args.input_scale, seed=args.seed, threads=args.threads, global_update=update,
        measure_baseline=False)) for update, label in BITS_VARIANTS]


OUTPUTS = ("report.md", "results.json", "runs", "plots")
"""What ``reproduce`` writes into its folder (the runs and plots in subfolders)."""


def _run_or_load(config: RunConfig, folder: str, progress: bool,
                 overwrite: bool = False) -> tuple[dict, dict, list[dict]]:
    """Run ``config`` in ``folder`` (resuming a stopped run; reading a finished one back; with
    ``overwrite``, replacing what a run wrote there)."""
    from .simulation import Simulation

    if overwrite:
        simulation = Simulation(config, folder, overwrite=True)
        return simulation.run(progress=progress), simulation.describe(), simulation.records
    if os.path.isfile(os.path.join(folder, "summary.json")):
        summary, described, records = load_run(folder)
        if summary["rounds"] == config.rounds and all(described.get(k) == v for k, v in config.to_dict().items()):
            return summary, described, records
        raise FileExistsError(f"{folder} holds another run; remove it or choose another --out")
    resume = os.path.isfile(os.path.join(folder, "checkpoint.json"))
    simulation = Simulation(config, folder, resume=resume)
    summary = simulation.run(progress=progress)
    return summary, simulation.describe(), simulation.records


def _row(label: str, s: dict) -> list[str]:
    wire = s["uplink_bits"] + s["downlink_bits"]
    fedavg = 2 * s["dense_uplink_bits"]
    ratio = "-" if s["algorithm"] == "fedavg" else ("nothing sent" if wire == 0 else f"{fedavg / wire:.0f}x")
    base = s["baseline_train_seconds"]
    return [
        label, f"{s['accuracy']:.2f}", f"{s['weight_density']:.3f}", f"{s['mean_row_density']:.3f}",
        si(s["uplink_bits"], "b"), si(s["downlink_bits"], "b"), ratio,
        si(s["train_flops"]), si(s["dense_train_flops"]), si(s["paper_train_flops"]),
        si(s["authors_flops_per_client"]), f"{s['train_seconds']:.1f}",
        "-" if base is None else f"{base:.1f} ({base / s['train_seconds']:.2f}x)",
    ]


HEADER = ["run", "accuracy %", "weight density", "mean row density", "bits up", "bits down",
          "FedAvg / this bits", "executed FLOPs", "dense FLOPs", "paper-formula FLOPs", "authors' FLOPs / client",
          "client train s", "masked dense s (speed-up)"]


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _bits_ratio(summary: dict) -> float:
    return 2 * summary["dense_uplink_bits"] / (summary["uplink_bits"] + summary["downlink_bits"])


def _bits_section(bits: list[tuple[str, dict, dict]]) -> list[str]:
    if not bits:
        return []
    config = bits[0][2]
    lines = [f"## Bits on the wire: LeNet-5, {config['clients']} clients, {config['sample']} per round",
             "",
             f"{config['rounds']} rounds on {config['dataset']} with preset `{config['preset']}` (no timing replay). "
             "Per sampled client FedAvg sends the full dense state down and up; SpaFL sends its thresholds up, "
             "and the global thresholds go down to the sampled clients (lazy) or to every client (eager).",
             "",
             "| run | thresholds | dense state bits | bits up | bits down | FedAvg bits | FedAvg / this |",
             "|---|---|---|---|---|---|---|"]
    for label, s, c in bits:
        lines.append(f"| {label} | {c['thresholds']} | {si(c['dense_state_bits'], 'b')} | "
                     f"{si(s['uplink_bits'], 'b')} | {si(s['downlink_bits'], 'b')} | "
                     f"{si(2 * s['dense_uplink_bits'], 'b')} | {_bits_ratio(s):.0f}x |")
    return [*lines, ""]


def _targets(results: dict[str, dict[str, tuple[str, dict, dict]]], bits: list[tuple[str, dict, dict]]) -> list[str]:
    """The reproduction's measurable targets, checked on the runs made."""
    lines = []
    for _, s, c in bits[:1]:
        ok = "met" if _bits_ratio(s) >= BIT_TARGET else "NOT met"
        lines.append(f"- FedAvg / SpaFL bits, LeNet-5, {c['clients']} clients, {c['sample']} per round, lazy: "
                     f"{_bits_ratio(s):.0f}x (target >= {BIT_TARGET:.0f}x: {ok})")
    for dataset, runs in results.items():
        spafl = runs["spafl"][1]
        config = runs["spafl"][2]
        wire = spafl["uplink_bits"] + spafl["downlink_bits"]
        ratio = 2 * spafl["dense_uplink_bits"] / wire if wire else float("inf")
        if config["model"] == "lenet5" and (config["clients"], config["sample"]) == (100, 10):
            ok = "met" if ratio >= BIT_TARGET else "NOT met"
            lines.append(f"- {dataset}: FedAvg / SpaFL bits (LeNet-5, 100 clients, 10 per round, lazy) = "
                         f"{ratio:.0f}x (target >= {BIT_TARGET:.0f}x: {ok})")
        local = runs["local"][1]
        ok = spafl["accuracy"] >= local["accuracy"] and spafl["mean_row_density"] <= 0.5
        lines.append(f"- {dataset}: SpaFL {spafl['accuracy']:.2f} % at mean row density "
                     f"{spafl['mean_row_density']:.3f} vs Local {local['accuracy']:.2f} % (target: SpaFL >= Local "
                     f"with mean row density <= 0.5: {'met' if ok else 'NOT met'})")
    return lines


def write_report(out: str, command: str, results: dict[str, dict[str, tuple[str, dict, dict]]],
                 plots: dict[str, list[str]], seconds: float, bits: list[tuple[str, dict, dict]] = ()) -> str:
    import torch

    first = next(iter(next(iter(results.values())).values()))[2]
    lines = [
        "# SpaFL reproduction: SpaFL vs FedAvg vs Local vs masked-dense SpaFL",
        "",
        "Written by `spafl-fl reproduce`; every number below was measured by the command:",
        "",
        "```",
        command,
        "```",
        "",
        f"torch {torch.__version__}, {first['torch_threads']} thread(s), sparse backend "
        f"`{first['resolved_backend']}`; the runs took {seconds / 60:.1f} minutes of wall time (sum of their "
        "rounds' `wall_seconds`; a run left by an earlier call with the same settings is read back, not rerun).",
        "",
        "Columns. *weight density*: fraction of the sparse layers' weights in active rows. *mean row density*: "
        "unweighted mean over sparse layers of their fraction of active rows (what the authors' code calls "
        "density). Both are the last round's, averaged over all clients. *bits*: what went on the wire over "
        "the whole run; *FedAvg / this bits*: FedAvg's bits for the same model, clients and rounds (the full "
        "state down to and up from each sampled client) over this run's. *executed FLOPs*: the multiply-adds "
        "x2 the kernels ran (pruned rows skipped; masked dense skips nothing); *dense FLOPs*: the same steps "
        "with every row active; *paper-formula FLOPs*: the paper's formula on the rows active at each step; "
        "*authors' FLOPs / client*: the authors' own count (one FLOP per multiply-add, each client's "
        "end-of-round density applied to its whole round, plus thresholds x batches + weights, summed over "
        "the run and averaged over all clients). *client train s*: measured seconds of the sampled clients' "
        "training steps; *masked dense s*: the same batches replayed on a copy with every sparse layer on "
        "`backend=reference` (the paper's compute), measured in the same run.",
        "",
        "## Targets",
        "",
        *_targets(results, list(bits)),
        "",
        *_bits_section(list(bits)),
    ]
    for dataset, runs in results.items():
        config = runs["spafl"][2]
        preset = config["preset"]
        differs = {k: config[k] for k in PRESETS[preset] if config.get(k) != PRESETS[preset][k]}
        lines += [
            f"## {dataset} ({config['model']}, preset `{preset}`)",
            "",
            f"{config['clients']} clients ({config['sample']} per round), {config['rounds']} rounds, "
            f"{config['local_epochs']} local epochs, batch {config['batch_size']}, lr {config['lr']}, "
            f"th_coeff {config['th_coeff']}, alpha {config['alpha']}, STE `{config['ste']}`, input scale "
            f"{config['input_scale']:g}, seed {config['seed']}. Preset values changed: "
            + (", ".join(f"{k}={v}" for k, v in differs.items()) or "none") + ".",
            "",
            _table([_row(label, summary) for label, summary, _ in runs.values()]),
            "",
            *[f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in plots[dataset]],
            "",
        ]
    path = os.path.join(out, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path


def reproduce(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .plots import plot_runs
    from .rundir import claim_out_dir

    try:
        if args.rounds < 1:
            raise ValueError(f"--rounds must be an integer >= 1 (got {args.rounds})")
        if args.bits_rounds < 0:
            raise ValueError(f"--bits-rounds must be an integer >= 0 (got {args.bits_rounds})")
        problems = threads_problems(args.threads)
        if problems:
            raise ValueError("; ".join(problems))
        runs = run_configs(args)
        bits_runs = bits_configs(args)
        claim_out_dir(args.out, overwrite=args.overwrite or args.resume, outputs=lambda name: name in OUTPUTS,
                      what="the page, results.json, plots and runs a previous reproduce wrote")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    command = "spafl-fl " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] \
        else "spafl-fl reproduce " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k != "command")
    wall = 0.0
    results: dict[str, dict[str, tuple[str, dict, dict]]] = {}
    records: dict[str, list[tuple[str, list[dict]]]] = {}
    for dataset, folder, label, config in runs:
        where = os.path.join(args.out, "runs", dataset, folder)
        print(f"{dataset}: {label} -> {where}", flush=True)
        try:
            summary, described, recs = _run_or_load(config, where, not args.no_progress, args.overwrite)
        except (ValueError, OSError, RuntimeError) as error:
            parser.error(str(error))
        results.setdefault(dataset, {})[folder] = (label, summary, described)
        wall += sum(rec["wall_seconds"] for rec in recs)
        records.setdefault(dataset, []).append((label, recs))
    bits = []
    for update, label, config in bits_runs:
        where = os.path.join(args.out, "runs", "bits", update)
        print(f"bits check: {label} -> {where}", flush=True)
        try:
            summary, described, recs = _run_or_load(config, where, not args.no_progress, args.overwrite)
        except (ValueError, OSError, RuntimeError) as error:
            parser.error(str(error))
        bits.append((label, summary, described))
        wall += sum(rec["wall_seconds"] for rec in recs)
    plots = {}
    for dataset, runs_records in records.items():
        folder = os.path.join(args.out, "plots", dataset)
        os.makedirs(folder, exist_ok=True)
        plots[dataset] = plot_runs(runs_records, folder)
    path = write_report(args.out, command, results, plots, wall, bits)
    atomic_write_text(os.path.join(args.out, "results.json"),
                      json.dumps({d: {k: s for k, (_, s, _) in r.items()} for d, r in results.items()}, indent=1))
    print(f"wrote {path} and results.json")
    return 0
