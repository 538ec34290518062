"""The algorithms a run can train, each described once and registered by name.

An ``Algorithm`` says everything an engine needs, so that no engine tests an algorithm's name:

- the model: sparse layers (SpaFL: thresholds, the penalty, the timed masked-dense replay) or dense;
- the client (``make_client``): what it keeps, trains and sends (``fit`` -> ``ClientUpdate``), what it does
  with what comes down (``receive``), how it is evaluated (``evaluate``, ``density``) and what of it a
  checkpoint or a Flower node keeps between rounds (``state``/``load_state``);
- the server: the global tensors it holds (``server_tensors``) and how it weighs updates (``weighting``,
  checked and averaged by ``server.Server``);
- what goes down and when (``down``): with the train instruction to each sampled client (``TRAIN``), after
  aggregation to every client with the evaluate instruction (``BROADCAST``), or nothing (``NONE``); and
  whether the evaluate instruction carries the global tensors without counting them (``evaluate_global``:
  FedAvg evaluates the global model, which the in-process loop holds in place).

Every engine runs a round the same way: ``receive`` (if something goes down with train), ``fit`` on the
sampled clients; ``Server.aggregate``; ``receive`` on every client (broadcast or global evaluation);
``evaluate`` every client. Adding an algorithm is one ``register(Algorithm(...))`` call (README).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from spafl_kernels import thresholds

from .client import DIFFERENCE, FedAvgClient, ForwardGuard, LocalClient, SpaFLClient

TRAIN, BROADCAST, NONE = "train", "broadcast", "none"
"""When the global tensors go down (``Algorithm.down``)."""


@dataclass(frozen=True)
class Algorithm:
    """One algorithm, as every engine runs it (module docstring)."""

    name: str
    help: str
    sparse: bool  # sparse layers (thresholds, penalty); False: the dense model
    personal: bool  # each client keeps its own model between rounds (else it uses the engine's shared scratch model)
    weighting: str  # how the server weighs the updates: "uniform" or "samples" (server.Server)
    server_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]  # the server's global tensors, from the init
    make_client: Callable  # (cid, model, data, config) -> a client (client.py)
    down: Callable  # (config) -> TRAIN | BROADCAST | NONE
    evaluate_global: bool = False  # the evaluate instruction carries the global tensors, uncounted
    timed_replay: bool = False  # the client can time its batches again on backend="reference"

    def train_payload(self, config, server_tensors: Mapping[str, torch.Tensor],
                      last_difference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """What goes down to a sampled client with its train instruction (None: nothing)."""
        if self.down(config) != TRAIN:
            return None
        payload = dict(server_tensors)
        if config.global_update == "lazy-last":  # the authors' FMNIST code: only the last round's difference
            payload.update({DIFFERENCE + name: t for name, t in last_difference.items()})
        return payload

    def evaluate_payload(self, server_tensors: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor] | None:
        """What goes down to every client with the evaluate instruction (None: nothing)."""
        if self.down(config) == BROADCAST or self.evaluate_global:
            return dict(server_tensors)
        return None

    def counts_evaluate_payload(self, config) -> bool:
        """Whether the evaluate payload is downlink the algorithm needs (a broadcast), not evaluation traffic."""
        return self.down(config) == BROADCAST


ALGORITHMS: dict[str, Algorithm] = {}


def register(description: Algorithm) -> Algorithm:
    """Make ``description`` runnable by every engine and ``--algorithm``."""
    if description.name in ALGORITHMS:
        raise ValueError(f"algorithm {description.name!r} is registered already")
    if description.weighting not in ("uniform", "samples"):
        raise ValueError(f"weighting must be 'uniform' or 'samples', got {description.weighting!r}")
    ALGORITHMS[description.name] = description
    return description


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}") from None


def _spafl_client(cid, model, data, config) -> SpaFLClient:
    guard = ForwardGuard(model, config.min_density) if config.collapse_guard == "before-forward" else None
    return SpaFLClient(cid, model, data, persistent=config.client_optimizer == "persistent", guard=guard)


register(Algorithm(
    "spafl", "thresholds on the wire, personal weights (the paper)", sparse=True, personal=True,
    weighting="uniform", server_tensors=thresholds, make_client=_spafl_client, timed_replay=True,
    down=lambda config: BROADCAST if config.global_update == "eager" else TRAIN))
register(Algorithm(
    "fedavg", "the dense model averaged, full state on the wire (McMahan et al.)", sparse=False, personal=False,
    weighting="samples", server_tensors=lambda init: {k: v.detach().clone() for k, v in init.state_dict().items()},
    make_client=lambda cid, model, data, config: FedAvgClient(cid, data, model), down=lambda config: TRAIN,
    evaluate_global=True))
register(Algorithm(
    "local", "every client trains its own dense model, nothing is sent (the control)", sparse=False, personal=True,
    weighting="uniform", server_tensors=lambda init: {},
    make_client=lambda cid, model, data, config: LocalClient(
        cid, model, data, persistent=config.client_optimizer == "persistent"),
    down=lambda config: NONE))
