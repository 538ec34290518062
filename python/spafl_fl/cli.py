"""``spafl-fl``: ``run`` a federated experiment, ``compare`` finished runs.

    spafl-fl run --dataset mnist5k --model lenet5 --rounds 30 --out runs/spafl
    spafl-fl run --algorithm fedavg --out runs/fedavg
    spafl-fl run --backend reference --out runs/masked-dense
    spafl-fl run --algorithm local --out runs/local
    spafl-fl run --preset fmnist-lenet5 --dataset mnist5k --rounds 30 --out runs/paper   (flags given win)
    spafl-fl compare runs/spafl runs/fedavg runs/local runs/masked-dense --plots runs/compare
    spafl-fl reproduce --out runs/reproduce   (SpaFL vs FedAvg vs Local vs masked dense, one Markdown page)
    spafl-fl flower --dataset mnist5k --model lenet5 --rounds 30 --out runs/flower   (pip install .[flower])
    spafl-fl export runs/spafl --client 3 --out client3.safetensors   (a smaller plain PyTorch model)
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from spafl_kernels import BACKEND_NAMES, STES, __version__

from .checkpoint import read_json_object
from .config import (
    ALGORITHMS,
    BATCH_ORDERS,
    CLASSIFIERS,
    CLIENT_OPTIMIZERS,
    COLLAPSE_GUARDS,
    GLOBAL_UPDATES,
    PRESETS,
    RUN_ONLY,
    SPLITS,
    RunConfig,
    config_problems,
    default_classifier,
    run_only_problems,
    threads_problems,
)
from .data import DATASETS
from .models import MODELS
from .results import compare_table, load_run, savings_report, si
from .rundir import PLOTS, claim_out_dir, clear_outputs

_DEFAULTS = RunConfig()  # every run flag's default
EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C (128 + SIGINT)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or it is required."""

    def _get_help_string(self, action):
        if action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


RUN_ONLY_FLAGS = ("--no-progress", *(f"--{key.replace('_', '-')}" for key in RUN_ONLY))
"""Flags whose behaviour only ``spafl-fl run`` has: the Flower commands' help leaves them out."""
_RUN_HELP = "run SpaFL, FedAvg or Local and write config.json, metrics.jsonl, summary.json, plots"


def _run_parser(sub, command: str = "run", help_text: str = _RUN_HELP) -> argparse.ArgumentParser:
    """The run flags, for ``run`` and for the Flower engines (``flower``, ``deploy-local``, ``flower-app``). What only
    ``run`` implements (the authors' behaviours, lazy-last, the progress bar) is listed in ``run``'s help only: the
    Flower commands still parse the authors' flags, to refuse them with a message that names ``run``, and take
    ``--no-progress``, so that a ``run`` command line works unchanged there."""
    p = sub.add_parser(command, help=help_text, description=help_text, formatter_class=_HelpFormatter)
    in_run = command == "run"

    def add(*names, **options):
        if not in_run and names[0] in RUN_ONLY_FLAGS:
            options["help"] = argparse.SUPPRESS
        return p.add_argument(*names, **options)

    add("--algorithm", choices=ALGORITHMS, default=_DEFAULTS.algorithm,
        help="spafl (thresholds on the wire), fedavg (dense model, full state on the wire) or local (each client "
        "trains its own dense model, nothing on the wire)")
    add("--dataset", default=_DEFAULTS.dataset, metavar="NAME|MODULE:CALLABLE",
        help=f"one of {', '.join(DATASETS)}: bundled data (mnist5k, digits, synthetic) or files read from "
        "--data-dir (fmnist, cifar10); or your own: MODULE:CALLABLE with CALLABLE() -> (x_train, y_train, "
        "x_test, y_test), float tensors [N, *input_shape] and int64 labels (MODULE importable from the current "
        "directory or the environment)")
    add("--data-dir", default=_DEFAULTS.data_dir,
        help="folder with the fmnist IDX or CIFAR-10 binary files (read for those datasets only)")
    add("--model", default=_DEFAULTS.model, metavar="NAME|MODULE:CALLABLE",
        help=f"one of {', '.join(MODELS)} (the paper's models), or your own: MODULE:CALLABLE with "
        "CALLABLE(num_classes, input_shape) -> torch.nn.Module, a plain model that SpaFL sparsifies")
    add("--skip", default=_DEFAULTS.skip, metavar="NAMES",
        help="layers of a MODULE:CALLABLE model that stay dense (comma-separated qualified names, e.g. head,fc2); "
        "layers sparsify cannot convert stay dense anyway, with a warning")
    add("--clients", type=int, default=_DEFAULTS.clients, help="number of clients")
    add("--sample", type=int, default=None,
        help=f"clients sampled per round (default: {_DEFAULTS.sample}, or --clients when that is fewer)")
    add("--rounds", type=int, default=_DEFAULTS.rounds, help="rounds in all (with --resume: including the rounds done)")
    add("--local-epochs", type=int, default=_DEFAULTS.local_epochs, help="passes over its data per client and round")
    add("--batch-size", type=int, default=_DEFAULTS.batch_size, help="local SGD batch size")
    add("--lr", type=float, default=_DEFAULTS.lr, help="local SGD learning rate (finite, > 0)")
    add("--lr-decay", type=float, default=_DEFAULTS.lr_decay, help="lr of round r = lr * lr_decay**r")
    add("--momentum", type=float, default=_DEFAULTS.momentum, help="local SGD momentum")
    add("--weight-decay", type=float, default=_DEFAULTS.weight_decay, help="local SGD weight decay (>= 0)")
    add("--clip", type=float, default=_DEFAULTS.clip, help="max gradient norm (0: off)")
    add("--th-coeff", type=float, default=_DEFAULTS.th_coeff, help="weight of sum(exp(-threshold)) in the loss")
    add("--th-warmup", type=int, default=_DEFAULTS.th_warmup, help="rounds of sigmoid warm-up of th-coeff (0: off)")
    add("--alpha", type=float, default=_DEFAULTS.alpha, help="Dirichlet concentration of the non-IID split")
    add("--test-fraction", type=float, default=_DEFAULTS.test_fraction,
        help="per-client test share (datasets without an official test set)")
    add("--ste", choices=STES, default=_DEFAULTS.ste, help="straight-through estimator of the sparse layers")
    add("--backend", choices=("auto", *BACKEND_NAMES), default=_DEFAULTS.backend,
        help="sparse-layer backend; 'reference' is the masked-dense baseline")
    add("--min-density", type=float, default=_DEFAULTS.min_density,
        help="layer-collapse guard of reset_collapsed, in [0, 1]")
    add("--seed", type=int, default=_DEFAULTS.seed, help="seed of the split, the model, the sampling and the batches")
    add("--device", default=_DEFAULTS.device, help="cpu or cuda[:N]")
    add("--threads", type=int, default=_DEFAULTS.threads, help="torch threads (0: torch's default)")
    add("--no-baseline", action="store_true", help="do not replay client training with backend=reference")
    add("--out", required=True, metavar="DIR",
        help="run folder; must be new or empty unless --resume or --overwrite")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
    once.add_argument("--overwrite", action="store_true",
                      help="replace the files a previous run wrote in DIR (other files are kept)")
    add("--no-progress", action="store_true", help="no progress bar")
    lazy_last = "lazy-last: only the last round's change (the authors' FMNIST code); " if in_run else ""
    add("--global-update", choices=GLOBAL_UPDATES if in_run else tuple(u for u in GLOBAL_UPDATES if u != "lazy-last"),
        default=_DEFAULTS.global_update,
        help="lazy: a client applies the whole global threshold change since it last trained when next "
        f"sampled; {lazy_last}eager: every client after every round (their CIFAR code)")
    add("--split", choices=SPLITS, default=_DEFAULTS.split,
        help="dirichlet: our seeded Dirichlet split; authors: the authors' Non_iid_split and client sampling, "
        "draw for draw (a held-out test set where the dataset has none)")
    add("--batch-order", choices=BATCH_ORDERS, default=_DEFAULTS.batch_order,
        help="seeded: per (seed, round, client); authors: drawn as the authors' DataLoaders draw torch's "
        "generator (with --split authors: their batches)")
    add("--client-optimizer", choices=CLIENT_OPTIMIZERS, default=_DEFAULTS.client_optimizer,
        help="persistent: each client keeps its SGD optimizer and momentum across rounds (the authors' code); "
        "fresh: a new SGD optimizer every round")
    add("--collapse-guard", choices=COLLAPSE_GUARDS, default=_DEFAULTS.collapse_guard,
        help="after-step: reset a layer at or under --min-density after each step; before-forward: reset it "
        "before the forward that follows one that kept that few rows, evaluation included (the authors' code)")
    add("--classifier", choices=CLASSIFIERS, default=None,
        help="the last Linear of lenet5, conv4 and mlp: dense (kept dense and personal, as the paper keeps the "
        "resnet18 and vit classifiers) or sparse (pruned like the others, as the authors' lenet5 code) (default: "
        "dense; a MODULE:CALLABLE model's layers are all sparse but those in --skip)")
    add("--input-scale", type=float, default=_DEFAULTS.input_scale,
        help="multiply the [0, 1] images by this (255: the raw pixels the authors trained on)")
    add("--preset", choices=tuple(PRESETS), default=None,
        help="the paper's setting for this experiment; flags given on the command line override it")
    return p


def apply_preset(sub_parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` again with the chosen preset's values as the defaults of ``sub_parser``, so
    that every flag given explicitly still wins."""
    first = sub_parser.parse_known_args(argv)[0]
    sub_parser.set_defaults(**PRESETS[first.preset])
    return sub_parser.parse_args(argv)


def _values(args: argparse.Namespace) -> dict:
    """``RunConfig`` fields from the flags; an unset ``--sample`` is its default clamped to ``--clients``."""
    sample = args.sample
    if sample is None:
        fits = isinstance(args.clients, int) and args.clients >= 1
        sample = min(_DEFAULTS.sample, args.clients) if fits else _DEFAULTS.sample
    return dict(
        algorithm=args.algorithm, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
        clients=args.clients, sample=sample, rounds=args.rounds, local_epochs=args.local_epochs,
        batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, momentum=args.momentum,
        weight_decay=args.weight_decay, clip=args.clip, th_coeff=args.th_coeff, th_warmup=args.th_warmup,
        alpha=args.alpha, test_fraction=args.test_fraction, ste=args.ste, backend=args.backend,
        min_density=args.min_density, seed=args.seed, device=args.device, threads=args.threads,
        measure_baseline=not args.no_baseline, global_update=args.global_update, input_scale=args.input_scale,
        preset=args.preset, skip=args.skip, split=args.split, client_optimizer=args.client_optimizer,
        collapse_guard=args.collapse_guard, batch_order=args.batch_order,
        classifier=args.classifier or default_classifier(args.model),
    )


def flag_problems(args: argparse.Namespace) -> list[str]:
    """Why the flags of ``run``/``flower``/``deploy-local``/``flower-app`` do not make a run, each naming
    its flag; empty when they do."""
    values = _values(args)
    problems = config_problems(values, flags=True)
    if args.data_dir is not None and args.dataset not in ("fmnist", "cifar10"):
        problems.append(f"--data-dir is read for --dataset fmnist and cifar10 only (got --dataset {args.dataset})")
    if not args.out:
        problems.append("--out is empty; name a folder")
    if args.command != "flower-app":  # the app runs on other machines: their CPU count decides there
        problems += threads_problems(args.threads)
    return problems


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**_values(args))


def _command(argv: list[str], drop: tuple[str, ...] = (), add: str | None = None) -> str:
    """The command line that ran, less the flags ``drop`` (or abbreviations of them), plus ``add``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = ["spafl-fl"] if name == "spafl-fl" else [sys.executable, "-m", "spafl_fl"]
    kept = [w for w in argv if not (w.startswith("--") and len(w) > 3 and any(f.startswith(w) for f in drop))]
    return shlex.join([*prog, *kept, *([add] if add else [])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="spafl-fl", description="SpaFL federated learning on sparse kernels")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"run": _run_parser(sub), "flower": _run_parser(
        sub, "flower", "run on Flower's simulation engine (Ray), the same Flower app as deploy-local; writes the "
        "files of `run` (needs pip install .[flower])")}
    _deploy_parser(sub)
    commands.update({name: sub.choices[name] for name in ("deploy-local", "flower-app")})
    cp = sub.add_parser("compare", help="print one table over finished runs", formatter_class=_HelpFormatter)
    cp.add_argument("dirs", nargs="+", metavar="DIR", help="folders of finished runs")
    cp.add_argument("--plots", metavar="OUT", help="also write the comparison plots into OUT (new or empty folder)")
    cp.add_argument("--overwrite", action="store_true", help="replace the plots a previous compare wrote in OUT")
    commands["compare"] = cp
    from .reproduce import add_reproduce_parser, reproduce

    add_reproduce_parser(sub)
    commands["reproduce"] = sub.choices["reproduce"]
    commands["export"] = _export_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):  # the run commands: re-parse with the preset's values as defaults
        command = args.command  # the subcommand is the first word: the rest are its flags
        args = apply_preset(commands[command], argv[1:])
        args.command = command
    usage = commands[args.command]

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "compare":
        return _compare(usage, args)
    if args.command == "reproduce":
        return reproduce(usage, args)
    if args.command == "export":
        return _export(usage, args)
    if args.command == "deploy-local":  # one SuperNode per client: --supernodes sets --clients
        if args.clients is not None and args.supernodes is not None and args.clients != args.supernodes:
            usage.error(f"one SuperNode per client: --supernodes {args.supernodes} but --clients {args.clients}")
        args.clients = args.clients or args.supernodes or _DEFAULTS.clients
    problems = flag_problems(args)
    if args.command != "run":
        problems += run_only_problems(_values(args))
    if problems:
        usage.error("; ".join(problems))
    if args.command == "flower":
        return _flower(usage, args, argv)
    if args.command == "deploy-local":
        return _deploy_local(usage, args)
    if args.command == "flower-app":
        return _flower_app(usage, args)

    from .simulation import Simulation

    try:
        simulation = Simulation(config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError, RuntimeError) as error:
        # A setup problem (flags, data files, an occupied --out, a damaged checkpoint) is the user's to fix.
        usage.error(str(error))
    except KeyboardInterrupt:
        print(f"spafl-fl: interrupted before the first round; run it again: {_command(argv)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        simulation.recorder.open_log()
    except OSError as error:
        usage.error(str(error))
    try:
        summary = simulation.run(progress=not args.no_progress)
    except (KeyboardInterrupt, OSError) as error:
        done = simulation.checkpointed
        if done:
            how = f"{done} of {args.rounds} rounds are saved in {args.out}; resume with: " + _command(
                argv, ("--resume", "--overwrite"), "--resume")
        else:
            how = f"no round was saved in {args.out}; start again with: " + _command(
                argv, ("--resume", "--overwrite"), "--overwrite")
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        print(f"spafl-fl: {what}; {how}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else 1
    finally:
        simulation.recorder.close()
    print(savings_report(summary, simulation.describe()))
    print(f"results in {args.out}: config.json, metrics.jsonl, summary.json, accuracy/density/bits/time .png")
    return 0


def _compare(usage: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``spafl-fl compare``: every folder is read and checked before anything is printed or written."""
    try:
        loaded = [(d, *load_run(d)) for d in args.dirs]
        if args.plots:
            claim_out_dir(args.plots, overwrite=args.overwrite, resumable=False,
                          what="the plots a previous compare wrote", outputs=lambda name: name in PLOTS)
    except (ValueError, OSError) as error:
        usage.error(str(error))
    print(compare_table([(d, s, c) for d, s, c, _ in loaded]))
    if args.plots:
        from .plots import plot_runs

        if args.overwrite:
            clear_outputs(args.plots, lambda name: name in PLOTS)
        os.makedirs(args.plots, exist_ok=True)
        for path in plot_runs([(d, records) for d, _, _, records in loaded], args.plots):
            print(f"wrote {path}")
    return 0


def _flower(usage: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """``spafl-fl flower``: the Flower app on Flower's simulation engine, one virtual SuperNode per client."""
    try:
        config = config_from_args(args)
        from .flower import run_flower_simulation
    except ImportError as error:
        usage.error(f"{error}: install the Flower extra, pip install --no-build-isolation '.[flower]'")
    except (ValueError, OSError, RuntimeError) as error:
        usage.error(str(error))
    try:
        summary = run_flower_simulation(config, args.out, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # flags, data files, an occupied --out: Ray not started
        usage.error(str(error))
    except RuntimeError as error:
        print(f"spafl-fl flower: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spafl-fl: interrupted; resume with: {_command(argv, ('--resume', '--overwrite'), '--resume')}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(savings_report(summary, read_json_object(os.path.join(args.out, "config.json"))))
    print(f"results in {args.out}: config.json, metrics.jsonl, summary.json, accuracy/density/bits/time .png")
    return 0


def _deploy_parser(sub) -> None:
    """``deploy-local`` (the ``run`` flags plus the deployment's) and ``flower-app``."""
    _run_parser(sub, "deploy-local", "run on Flower's deployment engine: a SuperLink and one SuperNode per client "
                "as processes on loopback, the app submitted with `flwr run`; writes the files of `run` "
                "(needs pip install .[flower])")
    p = sub.choices["deploy-local"]
    p.add_argument("--supernodes", type=int, help="SuperNodes, one per client (default: --clients; sets it)")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for the replies (a node that does not answer counts as failed)")
    p.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to wait for all SuperNodes")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds the whole run may take")
    p.set_defaults(clients=None)
    _run_parser(sub, "flower-app", "write the Flower app (pyproject.toml for `flwr run`) with these settings "
                "into --out, to run on SuperNodes you start yourself (README: Run across machines)")
    p = sub.choices["flower-app"]
    p.add_argument("--out-dir", default="", help="where the ServerApp writes the run, on the SuperLink's machine")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for the replies (a node that does not answer counts as failed)")
    p.add_argument("--connect-timeout", type=float, default=300.0, help="seconds the run waits for its SuperNodes")


def _deploy_local(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``spafl-fl deploy-local``: the run on real Flower processes; stops them on any exit."""
    import signal

    try:
        config = config_from_args(args)
        from .deploy import DeploymentError, deploy_local
    except ImportError as error:
        parser.error(f"{error}: install the Flower extra, pip install --no-build-isolation '.[flower]'")
    except (ValueError, OSError, RuntimeError) as error:
        parser.error(str(error))

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so the deployment's processes are stopped.
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        record = deploy_local(config, args.out, args.clients, resume=args.resume, overwrite=args.overwrite,
                              round_timeout=args.round_timeout, connect_timeout=args.connect_timeout,
                              timeout=args.timeout, say=lambda line: print(line, file=sys.stderr))
    except DeploymentError as error:
        print(f"spafl-fl deploy-local: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as error:  # flags, data files, an occupied --out: nothing started
        parser.error(str(error))
    except KeyboardInterrupt:
        print("spafl-fl deploy-local: interrupted; stopped the SuperLink and SuperNodes", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary, described, _ = load_run(args.out)
    print(savings_report(summary, described))
    traffic = record.get("flower_network_traffic") or {}
    print(f"  Flower carried  up {si(record.get('uplink_wire_bits'), 'b')} + down "
          f"{si(record.get('downlink_wire_bits'), 'b')} (Flower's count of the records); the SuperLink counted in "
          f"{si(8 * traffic.get('inbound-bytes', 0), 'b')}, out {si(8 * traffic.get('outbound-bytes', 0), 'b')}")
    print(f"  time            clients computed {record.get('client_compute_seconds', 0):.1f} s; the run took "
          f"{record['wall_seconds']:.1f} s (processes, network, queues)")
    print(f"results in {args.out}: config.json, metrics.jsonl, summary.json, deployment.json, plots")
    return 0


def _flower_app(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``spafl-fl flower-app``: write the app folder for ``flwr run``."""
    try:
        config = config_from_args(args)
        from .flower_app import app_config, write_app

        write_app(args.out, app_config(config, out_dir=args.out_dir, resume=args.resume,
                                       round_timeout=args.round_timeout, connect_timeout=args.connect_timeout),
                  overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"wrote {os.path.join(args.out, 'pyproject.toml')}; submit with: flwr run {args.out} <superlink connection>")
    return 0


# -- spafl-fl export ------------------------------------------------------------------------------------------


def _export_parser(sub) -> argparse.ArgumentParser:
    help_text = ("export one client's model of a run as a smaller plain PyTorch model: weights (safetensors), "
                 "architecture (.py, torch only), torch.export program (.pt2) and a report (.report.json/.md)")
    p = sub.add_parser("export", help=help_text, description=help_text, formatter_class=_HelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of a spafl or local run (its config.json and checkpoint)")
    p.add_argument("--client", type=int, required=True, metavar="K", help="which client's personalised model")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="weights file, ending in .safetensors; the other files go next to it with its stem")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export to FILE")
    return p


def _export(usage: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .exporting import export_client

    try:
        report, record = export_client(args.run_dir, args.client, args.out, overwrite=args.overwrite)
    except (ValueError, OSError, RuntimeError) as error:
        usage.error(str(error))
    print(report)
    print(f"test accuracy on client {args.client}'s {record['test_samples']} test samples: sparse "
          f"{record['sparse_test_accuracy']:.2f} %, exported {record['exported_test_accuracy']:.2f} %")
    if record["torch_export_problem"]:
        print(f"no .pt2: torch.export could not trace the model ({record['torch_export_problem']})")
    print("wrote " + ", ".join(record["files"]))
    return 0
