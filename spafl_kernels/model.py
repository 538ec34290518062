"""Whole-model helpers: conversion (``sparsify``) and the threshold bookkeeping of SpaFL (DESIGN §2).

Layers are keyed by their qualified module name (``model.named_modules()``), e.g. ``"features.0"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .modules import SparseConv2d, SparseLayer, SparseLinear


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    """``(name, layer)`` for every ``SparseLinear``/``SparseConv2d`` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLayer):
            yield name, module


def sparsify(
    model: nn.Module, *, ste: str = "identity", backend: str = "auto", skip: str | Iterable[str] = ()
) -> nn.Module:
    """Turn every ``nn.Linear``/``nn.Conv2d`` of ``model`` into its sparse twin, in place; modules named
    in ``skip`` (a qualified name or a list of them) and everything under them stay dense.

    Conversion keeps what the model means: each module changes its class in place (it becomes a
    ``SparseLinear``/``SparseConv2d`` with a new ``threshold`` parameter), so a module used twice or
    shared by two parents stays one module, its weight and bias stay the same ``Parameter`` objects
    (ties to other modules hold, ``requires_grad`` is kept, and a frozen layer's threshold is frozen
    too), and its hooks and parametrizations (``weight_norm``, ``spectral_norm``) keep working.

    Raises ``ValueError`` naming the module, before changing anything, for what it cannot convert
    faithfully: a subclass of ``nn.Linear``/``nn.Conv2d`` (its own behaviour would be lost) and a
    Conv2d whose ``padding_mode`` is not ``"zeros"``; skip those. ``nn.MultiheadAttention`` stays dense
    with a warning: it reads its ``out_proj.weight`` directly and never calls the submodule. Build
    attention from ``nn.Linear`` layers to make it sparse.

    Returns ``model``.
    """
    skip = {skip} if isinstance(skip, str) else set(skip)
    names = {}  # every module -> all of its qualified names (a shared module has several)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    unknown = sorted(skip - {name for aliases in names.values() for name in aliases})
    if unknown:
        raise ValueError(f"sparsify: skip names not found in the model: {unknown}")

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or not s for s in skip)

    attention = [name for module, aliases in names.items() if isinstance(module, nn.MultiheadAttention)
                 for name in aliases if not skipped(name)]
    for name in attention:
        skip.add(name)
        warnings.warn(
            f"sparsify: {name or 'model'} is an nn.MultiheadAttention, which uses its projection weights "
            "directly; it stays dense", stacklevel=2,
        )
    plan = []
    for module, aliases in names.items():
        if isinstance(module, SparseLayer) or any(skipped(name) for name in aliases):
            continue
        sparse_class = SparseLinear if isinstance(module, nn.Linear) else (
            SparseConv2d if isinstance(module, nn.Conv2d) else None)
        if sparse_class is None:
            continue
        problem = sparse_class.conversion_problem(module)
        if problem:
            raise ValueError(f"sparsify: cannot convert {aliases[0] or 'model'}: {problem}; leave it dense "
                             f"with skip=[{aliases[0]!r}] or convert it yourself")
        plan.append((module, sparse_class))
    for module, sparse_class in plan:
        sparse_class.convert_in_place(module, ste=ste, backend=backend)
    return model


def thresholds(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every sparse layer's threshold ``[out]``, detached copies keyed by layer name."""
    return {name: layer.threshold.detach().clone() for name, layer in sparse_layers(model)}


def mapping_problems(tensors, spec: Mapping[str, torch.Tensor], *, same_dtype: bool = True) -> list[str]:
    """Why ``tensors`` does not match ``spec`` (expected tensors by name): one string per problem, empty
    when it matches. Checks names, shapes, dtypes (with ``same_dtype=False``, only floating vs not) and
    that floating values are finite. Used for thresholds here and for client updates in ``spafl_fl``."""
    if not isinstance(tensors, Mapping):
        return [f"expected a mapping of name -> tensor, got {type(tensors).__name__}"]
    problems = []
    missing, unknown = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing:
        problems.append(f"missing {missing}")
    if unknown:
        problems.append(f"unknown names {unknown}")
    for name in sorted(set(spec) & set(tensors)):
        value, expected = tensors[name], spec[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name}: not a tensor ({type(value).__name__})")
        elif value.shape != expected.shape:
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
        elif value.dtype != expected.dtype and (
            same_dtype or value.is_floating_point() != expected.is_floating_point()
        ):
            problems.append(f"{name}: dtype {value.dtype}, expected {expected.dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{name}: non-finite values")
    return problems


def _check_mapping(model: nn.Module, mapping: Mapping[str, torch.Tensor], what: str) -> dict[str, SparseLayer]:
    """The model's sparse layers, after checking that ``mapping`` holds exactly their names, one finite
    floating ``[out]`` tensor each; raises ``ValueError`` listing every problem."""
    layers = dict(sparse_layers(model))
    problems = mapping_problems(mapping, {name: layer.threshold for name, layer in layers.items()}, same_dtype=False)
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    return layers


@torch.no_grad()
def load_thresholds(model: nn.Module, mapping: Mapping[str, torch.Tensor]) -> None:
    """Copy ``mapping[name]`` (``[out]`` each) into every sparse layer's threshold."""
    for name, layer in _check_mapping(model, mapping, "load_thresholds").items():
        layer.threshold.copy_(mapping[name])


@torch.no_grad()
def apply_threshold_update(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """The paper's global-threshold update: ``W_i -= d_i * sign(sum_j W_ij) / n`` on every element of
    row ``i``, with ``d = tau_global_new - tau_global_old`` per layer (``delta[name]``: ``[out]``) and
    ``n = kh*kw`` for Conv2d, ``in_features`` for Linear (as the paper's code does)."""
    for name, layer in _check_mapping(model, delta, "apply_threshold_update").items():
        w = layer.weight
        n = w.shape[1] if w.dim() == 2 else w.shape[2] * w.shape[3]
        row_sign = w.reshape(w.shape[0], -1).sum(1).sign()
        step = delta[name].to(device=w.device, dtype=w.dtype) * row_sign / n
        w.sub_(step.view(-1, *[1] * (w.dim() - 1)))


def threshold_penalty(model: nn.Module) -> torch.Tensor:
    """``sum_i exp(-tau_i)`` over every sparse layer's thresholds (a differentiable scalar)."""
    return sum((layer.threshold.neg().exp().sum() for _, layer in sparse_layers(model)), torch.zeros(()))


@torch.no_grad()
def reset_collapsed(model: nn.Module, min_density: float = 0.01) -> list[str]:
    """Zero the thresholds of every layer whose density is ``<= min_density`` (the paper's layer
    collapse guard). Returns the names of the layers reset."""
    reset = []
    for name, layer in sparse_layers(model):
        if layer.density() <= min_density:
            layer.threshold.zero_()
            reset.append(name)
    return reset


def density(model: nn.Module) -> dict[str, float]:
    """Fraction of active rows per sparse layer, and ``"total"``: the fraction of the sparse layers'
    weights that sit in active rows (1.0 for a model without sparse layers)."""
    result, active, total = {}, 0, 0
    for name, layer in sparse_layers(model):
        rows = layer.active_rows()
        result[name] = int(rows.sum()) / rows.numel() if rows.numel() else 1.0
        active += int(rows.sum()) * layer.fan_in
        total += rows.numel() * layer.fan_in
    result["total"] = active / total if total else 1.0
    return result
