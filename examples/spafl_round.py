"""SpaFL in plain PyTorch: one server and a few clients in one process, every step of a round written out.

Only ``torch`` and ``spafl_kernels`` are used; the data are made here (Gaussian clusters, each client
holding mostly two classes). Run it: ``python examples/spafl_round.py [--rounds 10]``.

A SpaFL round (lazy update, as the paper's code):
  1. each sampled client receives the global thresholds and turns the global difference ``new - old``
     into a weight update (``apply_threshold_update``, the paper's ``th_update``), then loads them;
  2. it trains weights and thresholds with the sparsity penalty, guarding against layer collapse;
  3. it sends its thresholds only (one number per row);
  4. the server averages the thresholds into the new global ones.
Clients keep their own weights across rounds (personalised models); only thresholds travel.
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import spafl_kernels as sk

FEATURES, CLASSES = 32, 10


def make_model() -> nn.Module:
    """A plain model; ``sparsify`` gives every Linear its per-row thresholds."""
    return nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def make_client_data(cid: int, n: int, centers: torch.Tensor, generator: torch.Generator):
    """``(x [n, FEATURES], y [n])``: 80 % of the samples from the client's two classes, the rest from any."""
    own = torch.tensor([cid % CLASSES, (cid + 1) % CLASSES])
    y = torch.where(torch.rand(n, generator=generator) < 0.8,
                    own[torch.randint(0, 2, (n,), generator=generator)],
                    torch.randint(0, CLASSES, (n,), generator=generator))
    x = centers[y] + torch.randn(n, FEATURES, generator=generator)
    return x, y


class Client:
    def __init__(self, cid: int, model: nn.Module, train, test):
        self.cid, self.model, self.train, self.test = cid, model, train, test
        self.last_global = sk.thresholds(model)  # the global thresholds this client saw last

    def receive(self, global_thresholds: dict[str, torch.Tensor]) -> None:
        """Step 1: the paper's global-threshold update, then the new thresholds themselves."""
        delta = {name: global_thresholds[name] - self.last_global[name] for name in global_thresholds}
        sk.apply_threshold_update(self.model, delta)
        sk.load_thresholds(self.model, global_thresholds)
        self.last_global = {name: t.clone() for name, t in global_thresholds.items()}

    def fit(self, epochs: int, lr: float, th_coeff: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Steps 2 and 3: local training with the penalty, then the thresholds to send."""
        opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        x, y = self.train
        self.model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=generator).split(32):
                opt.zero_grad()
                loss = F.cross_entropy(self.model(x[idx]), y[idx]) + th_coeff * sk.threshold_penalty(self.model)
                loss.backward()
                opt.step()
                sk.reset_collapsed(self.model, min_density=0.01)  # a collapsed layer starts over
        return sk.thresholds(self.model)

    @torch.no_grad()
    def accuracy(self) -> float:
        x, y = self.test
        self.model.eval()
        return 100.0 * float((self.model(x).argmax(1) == y).float().mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6, help="number of clients")
    parser.add_argument("--sample", type=int, default=3, help="clients trained per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds")
    parser.add_argument("--th-coeff", type=float, default=0.003, help="weight of the sparsity penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    centers = 2.0 * torch.randn(CLASSES, FEATURES, generator=generator)
    template = sk.sparsify(make_model())
    clients = [Client(cid, copy.deepcopy(template), make_client_data(cid, 200, centers, generator),
                      make_client_data(cid, 100, centers, generator)) for cid in range(args.clients)]
    global_thresholds = sk.thresholds(template)
    for r in range(1, args.rounds + 1):
        sampled = torch.randperm(args.clients, generator=generator)[:args.sample].tolist()
        sent = []
        for cid in sampled:
            clients[cid].receive(global_thresholds)
            sent.append(clients[cid].fit(epochs=2, lr=0.05, th_coeff=args.th_coeff, generator=generator))
        global_thresholds = {name: torch.stack([s[name] for s in sent]).mean(0) for name in global_thresholds}
        accuracy = sum(c.accuracy() for c in clients) / len(clients)
        rows = sum(sk.density(c.model)["total"] for c in clients) / len(clients)
        print(f"round {r:3d}: mean accuracy {accuracy:5.1f} %, weights in active rows {rows:.3f}")
    return {"accuracy": accuracy, "density": rows}


if __name__ == "__main__":
    main()
