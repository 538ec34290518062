"""Clients: local training, the update they send, evaluation on their own test split.

``SpaFLClient`` keeps its own (personalised) model across rounds, trains weights and thresholds, and
sends its thresholds only. ``FedAvgClient`` trains the global dense model it is sent and returns the
full state. Both time their training steps; a SpaFL client can also replay the very same batches on
a copy of its starting model with every sparse layer on ``backend="reference"`` (the paper's masked
dense compute), so the latency saving is measured on the same work in the same run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spafl_kernels import (
    apply_threshold_update,
    load_thresholds,
    reset_collapsed,
    sparse_layers,
    threshold_penalty,
    thresholds,
)
from spafl_kernels.flops import LayerFlops

from .accounting import FlopPlan, authors_flops, total_flops
from .data import ClientData


@dataclass
class LocalTraining:
    """One round's local-training hyperparameters (already scheduled for the round)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float = 0.0  # max gradient norm; 0 turns clipping off
    th_coeff: float = 0.0  # weight of threshold_penalty in the loss (SpaFL)
    min_density: float = 0.01  # reset_collapsed's guard (SpaFL)


@dataclass
class ClientUpdate:
    """What a client returns after a round: the message ``tensors`` and its bookkeeping."""

    client: int
    tensors: dict[str, torch.Tensor]
    num_samples: int
    train_loss: float
    train_seconds: float
    baseline_seconds: float | None = None  # the same batches with backend="reference"; None: not measured
    flops: LayerFlops = field(default_factory=LayerFlops)
    failure: str | None = None  # why local training failed (the server rejects the update); None: it did not
    authors_flops: float = 0.0  # the authors' count for this round (accounting.authors_flops); 0: not counted


class TrainingDiverged(RuntimeError):
    """Local training produced non-finite values. Carries what was measured up to that step:
    ``seconds``, mean ``loss`` of the finished steps (NaN when none finished) and ``flops``."""

    def __init__(self, reason: str, seconds: float, loss: float, flops: LayerFlops):
        super().__init__(reason)
        self.seconds, self.loss, self.flops = seconds, loss, flops


def _non_finite(tensors) -> list[str]:
    """Names of the floating tensors of ``(name, tensor)`` pairs holding NaN or inf (one host sync)."""
    pairs = [(name, t) for name, t in tensors if t.is_floating_point()]
    if not pairs:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in pairs])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(pairs, finite.tolist()) if not ok]


def make_batches(num_samples: int, epochs: int, batch_size: int, generator: torch.Generator,
                 drop_single: bool = False) -> list[torch.Tensor]:
    """Index batches for ``epochs`` passes over ``num_samples``, reshuffled each epoch.

    ``drop_single``: drop a trailing batch of one sample (BatchNorm cannot train on it).
    """
    batches = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        for chunk in order.split(batch_size):
            if drop_single and chunk.numel() == 1 and num_samples > 1:
                continue
            batches.append(chunk)
    return batches


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on a GPU: a step's time is only known once they are done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_local(
    model: nn.Module,
    data: ClientData,
    batches: list[torch.Tensor],
    hp: LocalTraining,
    *,
    sparse: bool,
    plan: FlopPlan | None = None,
) -> tuple[float, float, LayerFlops]:
    """Train ``model`` in place on ``data.x_train[batch]`` for each batch: SGD with momentum, cross
    entropy (+ ``hp.th_coeff * threshold_penalty`` and ``reset_collapsed`` after each step when
    ``sparse``), gradient-norm clipping when ``hp.clip > 0``.

    Returns ``(seconds, mean cross-entropy, FLOPs)``: seconds sum the timed steps only (forward,
    backward, clipping, optimiser step, collapse guard), never the batch gathering or the FLOP
    counting, which run between steps (``plan``, if given, counts each step on the rows active just
    before it).

    Raises ``TrainingDiverged`` as soon as a loss or a threshold is not finite, or when a parameter or
    buffer is not finite at the end (checked between timed steps); ``model`` is then left as it is.
    """
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    model.train()
    seconds, loss_sum, flops = 0.0, 0.0, LayerFlops()
    for step, idx in enumerate(batches):
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        if plan is not None:
            flops += total_flops(plan.step(model, idx.numel()))
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        objective = loss + hp.th_coeff * threshold_penalty(model) if sparse else loss
        objective.backward()
        if hp.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip)
        opt.step()
        if sparse:
            reset_collapsed(model, hp.min_density)
        _sync(device)
        seconds += time.perf_counter() - start
        value = float(loss.detach())
        where = f"training diverged at step {step + 1} of {len(batches)} (lr {hp.lr:g})"
        if not math.isfinite(value):
            raise TrainingDiverged(f"{where}: loss {value}", seconds, _mean(loss_sum, step), flops)
        loss_sum += value
        # A non-finite threshold would stop the next forward (the kernels refuse it): stop here instead.
        bad = _non_finite((f"{name}.threshold", layer.threshold) for name, layer in sparse_layers(model))
        if bad:
            raise TrainingDiverged(f"{where}: non-finite {bad[0]}", seconds, _mean(loss_sum, step + 1), flops)
    bad = _non_finite(model.state_dict().items())
    if bad:
        raise TrainingDiverged(f"training diverged (lr {hp.lr:g}): non-finite {bad[0]}", seconds,
                               _mean(loss_sum, len(batches)), flops)
    return seconds, loss_sum / max(len(batches), 1), flops


def _mean(total: float, count: int) -> float:
    return total / count if count else float("nan")


def train_or_fail(model: nn.Module, data: ClientData, batches: list[torch.Tensor], hp: LocalTraining, *,
                  sparse: bool, plan: FlopPlan | None = None) -> tuple[float, float, LayerFlops, str | None]:
    """``train_local``, with a divergence reported as ``(seconds, loss, FLOPs so far, reason)`` instead of
    raised (reason None when training finished)."""
    try:
        return (*train_local(model, data, batches, hp, sparse=sparse, plan=plan), None)
    except TrainingDiverged as diverged:
        return diverged.seconds, diverged.loss, diverged.flops, str(diverged)


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientData, batch_size: int = 512) -> tuple[float, float]:
    """``(accuracy in percent, mean cross-entropy)`` of ``model`` on ``data``'s test split."""
    device = next(model.parameters()).device
    model.eval()
    correct, loss_sum, n = 0, 0.0, int(data.y_test.shape[0])
    for start in range(0, n, batch_size):
        x = data.x_test[start:start + batch_size].to(device)
        y = data.y_test[start:start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return 100.0 * correct / max(n, 1), loss_sum / max(n, 1)


def set_backend(model: nn.Module, backend: str) -> None:
    """Point every sparse layer of ``model`` at ``backend``."""
    for _, layer in sparse_layers(model):
        layer.backend = backend


class SpaFLClient:
    """A SpaFL client: its own model (weights persist across rounds), its data, and the last global
    thresholds it received (to turn the next broadcast into the global difference)."""

    def __init__(self, cid: int, model: nn.Module, data: ClientData):
        self.cid = cid
        self.model = model
        self.data = data
        self.global_thresholds = thresholds(model)

    def receive_global(self, global_thresholds: Mapping[str, torch.Tensor]) -> None:
        """The server's broadcast after aggregation: apply the paper's ``th_update`` with the global
        difference ``new - previous`` to the weights, and remember ``new`` for the next round."""
        delta = {name: global_thresholds[name] - self.global_thresholds[name] for name in self.global_thresholds}
        apply_threshold_update(self.model, delta)
        self.global_thresholds = {name: t.detach().clone() for name, t in global_thresholds.items()}

    def fit(
        self,
        hp: LocalTraining,
        batches: list[torch.Tensor],
        *,
        plan: FlopPlan | None = None,
        measure_baseline: bool = False,
        baseline_first: bool = False,
    ) -> ClientUpdate:
        """Load the global thresholds, train on ``batches``, return the thresholds as the update.

        ``measure_baseline``: also time the same batches on a copy of the starting model with every
        sparse layer on ``reference`` (the copy is thrown away). ``baseline_first`` runs the copy
        first, so that alternating it cancels any warm-up advantage of going second.

        When training diverges (non-finite loss, thresholds or weights), the model goes back to its
        state before this round and the update carries the reason in ``failure`` (the server rejects it).
        """
        load_thresholds(self.model, self.global_thresholds)
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        baseline = None
        twin = None
        if measure_baseline:
            twin = copy.deepcopy(self.model)
            set_backend(twin, "reference")
            if baseline_first:
                baseline = train_or_fail(twin, self.data, batches, hp, sparse=True)[0]
        seconds, loss, flops, failure = train_or_fail(self.model, self.data, batches, hp, sparse=True, plan=plan)
        if twin is not None and not baseline_first:
            baseline = train_or_fail(twin, self.data, batches, hp, sparse=True)[0]
        if failure is not None:
            self.model.load_state_dict(start)
        return ClientUpdate(self.cid, thresholds(self.model), self.data.num_train, loss, seconds, baseline, flops,
                            failure=failure, authors_flops=_authors(plan, self.model, self.data, hp))

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.data)


class FedAvgClient:
    """A FedAvg client: data only; it trains whatever global model it is sent."""

    def __init__(self, cid: int, data: ClientData):
        self.cid = cid
        self.data = data

    def fit(self, model: nn.Module, global_state: Mapping[str, torch.Tensor], hp: LocalTraining,
            batches: list[torch.Tensor], *, plan: FlopPlan | None = None) -> ClientUpdate:
        """Load ``global_state`` into ``model`` (a scratch model of the architecture), train, return its full state."""
        model.load_state_dict(global_state)
        seconds, loss, flops, failure = train_or_fail(model, self.data, batches, hp, sparse=False, plan=plan)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ClientUpdate(self.cid, state, self.data.num_train, loss, seconds, None, flops,
                            failure=failure, authors_flops=_authors(plan, model, self.data, hp))


class LocalClient:
    """The Local baseline's client: its own dense model, trained on its own data, never communicated."""

    def __init__(self, cid: int, model: nn.Module, data: ClientData):
        self.cid = cid
        self.model = model
        self.data = data

    def fit(self, hp: LocalTraining, batches: list[torch.Tensor], *, plan: FlopPlan | None = None) -> ClientUpdate:
        """Train the own model on ``batches``; the update carries no tensors (nothing goes on the wire).
        A diverged round is undone (the model goes back to its state before it) and reported in ``failure``."""
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        seconds, loss, flops, failure = train_or_fail(self.model, self.data, batches, hp, sparse=False, plan=plan)
        if failure is not None:
            self.model.load_state_dict(start)
        return ClientUpdate(self.cid, {}, self.data.num_train, loss, seconds, None, flops,
                            failure=failure, authors_flops=_authors(plan, self.model, self.data, hp))

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.data)


def _authors(plan: FlopPlan | None, model: nn.Module, data: ClientData, hp: LocalTraining) -> float:
    """The authors' FLOP count of the round just trained (0 without a plan)."""
    if plan is None:
        return 0.0
    return authors_flops(plan, model, data.num_train, hp.epochs, -(-data.num_train // hp.batch_size))
