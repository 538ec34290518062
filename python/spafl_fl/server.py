"""The server: samples clients, checks every update it receives, averages the good ones.

One class serves both algorithms: SpaFL's server holds the global thresholds and averages the
clients' thresholds uniformly (the paper's code); FedAvg's holds the global state and weights each
client by its number of training samples (McMahan et al.). A malformed update (names, shapes,
dtypes, non-finite values), or one whose client reports that its training failed (diverged), is
logged with its reason and left out; the round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spafl_kernels.whole_model import mapping_problems

from .client import ClientUpdate

log = logging.getLogger("spafl_fl")


def update_problems(tensors, spec: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``tensors`` is not a valid update against ``spec`` (the expected tensors, by name): one
    string per problem (names, shapes, exact dtypes, finite values), empty when valid."""
    return mapping_problems(tensors, spec, same_dtype=True)


@dataclass
class Aggregate:
    """A round's result: the new global tensors, ``new - old`` for the floating ones, and the
    ``(client, reason)`` of every rejected update."""

    tensors: dict[str, torch.Tensor]
    difference: dict[str, torch.Tensor]
    accepted: list[int]
    rejected: list[tuple[int, str]]


class Server:
    """Holds the global tensors (``initial``: name -> tensor) and aggregates client updates.

    ``weighting``: ``"uniform"`` (SpaFL's threshold average) or ``"samples"`` (FedAvg).
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], num_clients: int, sample: int, seed: int,
                 weighting: str = "uniform"):
        if not 1 <= sample <= num_clients:
            raise ValueError(f"need 1 <= sample ({sample}) <= clients ({num_clients})")
        if weighting not in ("uniform", "samples"):
            raise ValueError(f"weighting must be 'uniform' or 'samples', got {weighting!r}")
        self.tensors = {name: t.detach().clone() for name, t in initial.items()}
        self.num_clients, self.sample, self.seed, self.weighting = num_clients, sample, seed, weighting

    def sample_clients(self, round_index: int) -> list[int]:
        """The clients of round ``round_index``: ``sample`` of them without replacement, a function of
        (seed, round) alone, so a resumed run samples exactly as an uninterrupted one."""
        rng = np.random.default_rng([self.seed, round_index])
        return sorted(int(k) for k in rng.choice(self.num_clients, self.sample, replace=False))

    def aggregate(self, updates: Sequence[ClientUpdate], round_index: int | None = None) -> Aggregate:
        """Average the valid updates into the new global tensors (unchanged when none is valid, or when
        their average is not finite: then every update of the round is rejected)."""
        good, rejected = [], []
        for update in updates:
            problems = self.update_problems(update)
            if problems:
                reason = "; ".join(problems)
                log.warning("round %s: rejected the update of client %d: %s", round_index, update.client, reason)
                rejected.append((update.client, reason))
            else:
                good.append(update)
        new = {name: t.clone() for name, t in self.tensors.items()}
        if good:
            if self.weighting == "samples":
                weights = torch.tensor([float(u.num_samples) for u in good], dtype=torch.float64)
            else:
                weights = torch.ones(len(good), dtype=torch.float64)
            weights /= weights.sum()
            for name, old in self.tensors.items():
                # Accumulate in float64 so the average does not depend on the summation order's rounding.
                acc = sum(w * u.tensors[name].to(torch.float64) for w, u in zip(weights.tolist(), good))
                new[name] = (acc if old.is_floating_point() else acc.round()).to(old.dtype)
            broken = sorted(name for name, t in new.items() if t.is_floating_point() and not bool(t.isfinite().all()))
            if broken:
                reason = f"the average of the round's updates is not finite in {broken[:5]}"
                log.warning("round %s: kept the global model: %s", round_index, reason)
                rejected += [(u.client, reason) for u in good]
                good, new = [], {name: t.clone() for name, t in self.tensors.items()}
        difference = {name: new[name] - self.tensors[name] for name in new if new[name].is_floating_point()}
        self.tensors = new
        return Aggregate(new, difference, [u.client for u in good], rejected)

    def update_problems(self, update: ClientUpdate) -> list[str]:
        """Why ``update`` cannot enter the average: the failure its client reported, a weight (number of
        training samples) that is missing, not positive or not finite when updates are weighted by
        it, or its tensors' problems (``update_problems``). Empty when it can."""
        if update.failure is not None:
            return [update.failure if isinstance(update.failure, str) and update.failure.strip()
                    else "the client reported a failure without a reason"]
        weight = update.num_samples
        if self.weighting == "samples" and not (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                                and math.isfinite(weight) and weight > 0):
            return [f"its weight (number of training samples) must be a finite number > 0, got {weight!r}"]
        return update_problems(update.tensors, self.tensors)
