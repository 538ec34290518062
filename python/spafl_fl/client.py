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
    density,
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


def loader_pass(generator: torch.Generator, num_samples: int, batch_size: int) -> list[torch.Tensor]:
    """One pass of ``DataLoader(shuffle=True)`` over ``num_samples`` as torch's loader draws the generator
    it continues (``generator``: the global one's state): the iterator's base seed, then the sampler's seed,
    which seeds the permutation. Returns the pass's index batches."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader iterator's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on a GPU: a step's time is only known once they are done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardGuard:
    """The authors' layer-collapse guard: a layer whose previous forward kept ``<= min_density`` of its
    rows gets its thresholds reset to 0 just before the next forward (their layers check the mask ratio
    of their last forward, training or evaluation, at the start of each forward). Holds that ratio per
    layer across rounds; ``last`` starts at 1.0 (no forward yet)."""

    def __init__(self, model: nn.Module, min_density: float):
        self.min_density = min_density
        self.last = {name: 1.0 for name, _ in sparse_layers(model)}

    @torch.no_grad()
    def before_forward(self, model: nn.Module) -> list[str]:
        """Reset the layers whose last forward collapsed, then record the ratio the coming forward uses.
        Returns the names of the layers reset."""
        reset = []
        for name, layer in sparse_layers(model):
            if self.last[name] <= self.min_density:
                layer.threshold.zero_()
                reset.append(name)
            self.last[name] = layer.density()
        return reset


def make_optimizer(model: nn.Module, hp: LocalTraining) -> torch.optim.Optimizer:
    """The local optimiser: SGD with ``hp``'s lr, momentum and weight decay over every parameter."""
    return torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def train_local(
    model: nn.Module,
    data: ClientData,
    batches: list[torch.Tensor],
    hp: LocalTraining,
    *,
    sparse: bool,
    plan: FlopPlan | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    guard: ForwardGuard | None = None,
) -> tuple[float, float, LayerFlops]:
    """Train ``model`` in place on ``data.x_train[batch]`` for each batch: SGD with momentum, cross
    entropy (+ ``hp.th_coeff * threshold_penalty`` and ``reset_collapsed`` after each step when
    ``sparse``), gradient-norm clipping when ``hp.clip > 0``.

    ``optimizer``: an SGD optimizer over ``model``'s parameters to continue (its momentum buffers
    carry over; its lr is set to ``hp.lr``); None: a new one (``make_optimizer``). ``guard``: the
    authors' collapse guard before each forward instead of ``reset_collapsed`` after each step.

    Returns ``(seconds, mean cross-entropy, FLOPs)``: seconds sum the timed steps only (forward,
    backward, clipping, optimiser step, collapse guard), never the batch gathering or the FLOP
    counting, which run between steps (``plan``, if given, counts each step on the rows active just
    before it).

    Raises ``TrainingDiverged`` as soon as a loss or a threshold is not finite, or when a parameter or
    buffer is not finite at the end (checked between timed steps); ``model`` is then left as it is.
    """
    device = next(model.parameters()).device
    opt = make_optimizer(model, hp) if optimizer is None else optimizer
    for group in opt.param_groups:
        group["lr"] = hp.lr
    model.train()
    seconds, loss_sum, flops = 0.0, 0.0, LayerFlops()
    for step, idx in enumerate(batches):
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        if plan is not None:
            flops += total_flops(plan.step(model, idx.numel()))
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if sparse and guard is not None:
            guard.before_forward(model)
        loss = F.cross_entropy(model(x), y)
        objective = loss + hp.th_coeff * threshold_penalty(model) if sparse else loss
        objective.backward()
        if hp.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip)
        opt.step()
        if sparse and guard is None:
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
                  sparse: bool, plan: FlopPlan | None = None, optimizer: torch.optim.Optimizer | None = None,
                  guard: ForwardGuard | None = None) -> tuple[float, float, LayerFlops, str | None]:
    """``train_local``, with a divergence reported as ``(seconds, loss, FLOPs so far, reason)`` instead of
    raised (reason None when training finished)."""
    try:
        return (*train_local(model, data, batches, hp, sparse=sparse, plan=plan, optimizer=optimizer,
                             guard=guard), None)
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


class _KeepsOptimizer:
    """A client that may keep one SGD optimizer (momentum buffers) across rounds (``persistent``)."""

    model: nn.Module
    persistent: bool
    optimizer: torch.optim.Optimizer | None

    def _optimizer(self, hp: LocalTraining) -> torch.optim.Optimizer | None:
        """The optimizer to continue this round (created on first use); None: a fresh one each round."""
        if not self.persistent:
            return None
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, hp)
        return self.optimizer

    def momentum(self) -> dict[str, torch.Tensor]:
        """The kept optimizer's momentum buffer per parameter name (zeros before its first step: SGD's
        first step sets the buffer to the gradient, exactly what a zero buffer gives)."""
        state = self.optimizer.state if self.optimizer is not None else {}
        buffers = {}
        for name, p in self.model.named_parameters():
            buf = state[p].get("momentum_buffer") if p in state else None
            buffers[name] = buf if buf is not None else torch.zeros_like(p)
        return buffers

    def load_momentum(self, buffers: Mapping[str, torch.Tensor], hp: LocalTraining) -> None:
        """Restore the kept optimizer's momentum buffers (``momentum``'s output) on resume."""
        opt = self._optimizer(hp)
        for name, p in self.model.named_parameters():
            opt.state[p]["momentum_buffer"] = buffers[name].to(p.device).clone()


class SpaFLClient(_KeepsOptimizer):
    """A SpaFL client: its own model (weights persist across rounds), its data, and the last global
    thresholds it received (to turn the next broadcast into the global difference).

    ``persistent``: keep one SGD optimizer across rounds (the authors' code); ``guard``: the authors'
    collapse guard (``ForwardGuard``) before every forward, evaluation included, instead of
    ``reset_collapsed`` after each step."""

    def __init__(self, cid: int, model: nn.Module, data: ClientData, *, persistent: bool = False,
                 guard: ForwardGuard | None = None):
        self.cid = cid
        self.model = model
        self.data = data
        self.global_thresholds = thresholds(model)
        self.persistent, self.optimizer, self.guard = persistent, None, guard

    def receive_global(self, global_thresholds: Mapping[str, torch.Tensor],
                       difference: Mapping[str, torch.Tensor] | None = None) -> None:
        """The server's broadcast: apply the paper's ``th_update`` to the weights with the global
        difference ``new - previous`` (``difference``, when given: that one instead, e.g. only the last
        round's, as the authors' FMNIST code does), and remember ``new`` for the next round."""
        if difference is None:
            difference = {name: global_thresholds[name] - self.global_thresholds[name]
                          for name in self.global_thresholds}
        apply_threshold_update(self.model, difference)
        self.global_thresholds = {name: t.detach().clone() for name, t in global_thresholds.items()}

    def receive(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """What came down from the server (``algorithms``): the global thresholds, and with ``lazy-last`` the
        last round's difference under ``difference.<name>``."""
        difference = {k[len(DIFFERENCE):]: v for k, v in tensors.items() if k.startswith(DIFFERENCE)}
        if difference:
            self.receive_global({k: v for k, v in tensors.items() if not k.startswith(DIFFERENCE)}, difference)
        else:
            self.receive_global(tensors)

    def state(self) -> dict[str, torch.Tensor]:
        """What this client keeps between rounds (its model, the global thresholds it holds, the kept
        optimizer's momentum, the collapse guard's ratios), for checkpoints and a Flower node's state."""
        tensors = {**_prefixed("client", self.model.state_dict()), **_prefixed("held", self.global_thresholds)}
        if self.guard is not None:
            tensors["guard"] = torch.tensor(list(self.guard.last.values()), dtype=torch.float64)
        if self.persistent:
            tensors.update(_prefixed("momentum", self.momentum()))
        return tensors

    def load_state(self, tensors: Mapping[str, torch.Tensor], hp: LocalTraining) -> None:
        """Restore ``state()``'s output (``hp``: the next round's, for a kept optimizer)."""
        device = next(self.model.parameters()).device
        self.model.load_state_dict(_unprefixed("client", tensors))
        self.global_thresholds = {k: v.to(device) for k, v in _unprefixed("held", tensors).items()}
        if self.guard is not None:
            self.guard.last = dict(zip(self.guard.last, tensors["guard"].tolist()))
        if self.persistent:
            self.load_momentum(_unprefixed("momentum", tensors), hp)

    def density(self) -> dict[str, float]:
        return density(self.model)

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
        opt = self._optimizer(hp)
        opt_start = copy.deepcopy(opt.state_dict()) if opt is not None else None
        guard_start = dict(self.guard.last) if self.guard is not None else None
        baseline = None
        twin = None
        if measure_baseline:
            twin = copy.deepcopy(self.model)
            set_backend(twin, "reference")
            if baseline_first:
                baseline = train_or_fail(twin, self.data, batches, hp, sparse=True)[0]
        seconds, loss, flops, failure = train_or_fail(self.model, self.data, batches, hp, sparse=True, plan=plan,
                                                      optimizer=opt, guard=self.guard)
        if twin is not None and not baseline_first:
            baseline = train_or_fail(twin, self.data, batches, hp, sparse=True)[0]
        if failure is not None:
            self.model.load_state_dict(start)
            if opt is not None:
                opt.load_state_dict(opt_start)
            if self.guard is not None:
                self.guard.last = guard_start
        return ClientUpdate(self.cid, thresholds(self.model), self.data.num_train, loss, seconds, baseline, flops,
                            failure=failure, authors_flops=_authors(plan, self.model, self.data, hp))

    def evaluate(self) -> tuple[float, float]:
        """``(accuracy %, loss)`` on the own test split; with the authors' guard, its check runs first (their
        evaluation forward resets a layer whose previous forward collapsed)."""
        if self.guard is not None:
            self.guard.before_forward(self.model)
        return evaluate(self.model, self.data)


class _DenseClient:
    """Evaluation of a client whose model is dense (FedAvg, Local)."""

    model: nn.Module
    data: ClientData

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.data)

    def density(self) -> None:
        return None  # dense: no per-layer densities


class FedAvgClient(_DenseClient):
    """A FedAvg client: its data and a model of the architecture (it may be shared by several clients:
    every message loads the global state into it before use)."""

    def __init__(self, cid: int, data: ClientData, model: nn.Module):
        self.cid = cid
        self.data = data
        self.model = model

    def receive(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Load the global state into the model (before training, and before evaluating the global model)."""
        self.model.load_state_dict(global_state)

    def fit(self, hp: LocalTraining, batches: list[torch.Tensor], *, plan: FlopPlan | None = None,
            **_timing) -> ClientUpdate:
        """Train the global state received, return the model's full state."""
        seconds, loss, flops, failure = train_or_fail(self.model, self.data, batches, hp, sparse=False, plan=plan)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return ClientUpdate(self.cid, state, self.data.num_train, loss, seconds, None, flops,
                            failure=failure, authors_flops=_authors(plan, self.model, self.data, hp))


    def state(self) -> dict[str, torch.Tensor]:
        return {}  # nothing personal: the global state is the server's

    def load_state(self, tensors: Mapping[str, torch.Tensor], hp: LocalTraining) -> None:
        pass


class LocalClient(_DenseClient, _KeepsOptimizer):
    """The Local baseline's client: its own dense model, trained on its own data, never communicated.
    ``persistent``: keep one SGD optimizer across rounds."""

    def __init__(self, cid: int, model: nn.Module, data: ClientData, *, persistent: bool = False):
        self.cid = cid
        self.model = model
        self.data = data
        self.persistent, self.optimizer = persistent, None

    def receive(self, tensors: Mapping[str, torch.Tensor]) -> None:
        pass  # nothing comes down

    def fit(self, hp: LocalTraining, batches: list[torch.Tensor], *, plan: FlopPlan | None = None,
            **_timing) -> ClientUpdate:
        """Train the own model on ``batches``; the update carries no tensors (nothing goes on the wire).
        A diverged round is undone (the model goes back to its state before it) and reported in ``failure``."""
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = self._optimizer(hp)
        opt_start = copy.deepcopy(opt.state_dict()) if opt is not None else None
        seconds, loss, flops, failure = train_or_fail(self.model, self.data, batches, hp, sparse=False, plan=plan,
                                                      optimizer=opt)
        if failure is not None:
            self.model.load_state_dict(start)
            if opt is not None:
                opt.load_state_dict(opt_start)
        return ClientUpdate(self.cid, {}, self.data.num_train, loss, seconds, None, flops,
                            failure=failure, authors_flops=_authors(plan, self.model, self.data, hp))


    def state(self) -> dict[str, torch.Tensor]:
        """The own model (and the kept optimizer's momentum), for checkpoints and a Flower node's state."""
        tensors = _prefixed("client", self.model.state_dict())
        if self.persistent:
            tensors.update(_prefixed("momentum", self.momentum()))
        return tensors

    def load_state(self, tensors: Mapping[str, torch.Tensor], hp: LocalTraining) -> None:
        self.model.load_state_dict(_unprefixed("client", tensors))
        if self.persistent:
            self.load_momentum(_unprefixed("momentum", tensors), hp)


DIFFERENCE = "difference."
"""Prefix of the last round's global difference in what goes down to a SpaFL client (``lazy-last``)."""


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def _unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def _authors(plan: FlopPlan | None, model: nn.Module, data: ClientData, hp: LocalTraining) -> float:
    """The authors' FLOP count of the round just trained (0 without a plan)."""
    if plan is None:
        return 0.0
    return authors_flops(plan, model, data.num_train, hp.epochs, -(-data.num_train // hp.batch_size))
