"""Whole-model helpers: conversion (``sparsify``) and the threshold bookkeeping of SpaFL (docs/DESIGN.md §2).

Layers are keyed by their qualified module name (``model.named_modules()``), e.g. ``"features.0"``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .modules import SparseConv2d, SparseLayer, SparseLinear, check_backend
from .semantics import check_ste


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    """``(name, layer)`` for every ``SparseLinear``/``SparseConv2d`` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLayer):
            yield name, module


# Modules of torch.nn that read a child Linear's weight directly instead of calling it: a sparse child would
# be ignored there, so those children stay dense (with a warning). Class -> the child it reads.
_READS_CHILD_WEIGHT = {nn.MultiheadAttention: "out_proj"}
if hasattr(nn, "LinearCrossEntropyLoss"):  # PyTorch >= 2.13
    _READS_CHILD_WEIGHT[nn.LinearCrossEntropyLoss] = "linear"


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

    Every argument is checked, and raises ``ValueError`` naming the module, before anything changes, for
    what it cannot convert faithfully: a subclass of ``nn.Linear``/``nn.Conv2d`` (its own behaviour would be
    lost) and a Conv2d whose ``padding_mode`` is not ``"zeros"``; skip those. Should a conversion still
    fail, every module converted so far is restored: the model is as before.

    Modules that read a child's weight directly instead of calling the child would ignore its pruning:
    ``nn.MultiheadAttention`` (its ``out_proj``) and ``nn.LinearCrossEntropyLoss`` (its ``linear``) stay
    dense with a warning (build attention from ``nn.Linear`` layers to make it sparse). An
    ``nn.TransformerEncoderLayer`` whose ``linear1``/``linear2`` become sparse has its inference fast path
    (``torch._transformer_encoder_layer_fwd``, which reads their weights) turned off: it runs its standard
    path, the one it trains with, in every mode; an ``nn.TransformerEncoder`` of such layers stops
    converting padded batches to nested tensors (with a warning: padded positions of its output then hold
    what the standard path computes, not zeros). Code of your own that reads ``layer.weight`` instead of
    calling the layer sees the dense weight.

    Returns ``model``.
    """
    check_ste(ste)
    check_backend(backend)
    if isinstance(skip, str):
        skip = {skip}
    else:
        skip = list(skip) if isinstance(skip, Iterable) else [skip]
        wrong = [s for s in skip if not isinstance(s, str)]
        if wrong:
            raise TypeError(f"sparsify: skip must be a module name or a list of them, got {wrong[0]!r}")
        skip = set(skip)
    names = {}  # every module -> all of its qualified names (a shared module has several)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    unknown = sorted(skip - {name for aliases in names.values() for name in aliases})
    if unknown:
        raise ValueError(f"sparsify: skip names not found in the model: {unknown}")

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or not s for s in skip)

    dense_parents = [(name, module) for module, aliases in names.items()
                     if isinstance(module, tuple(_READS_CHILD_WEIGHT)) for name in aliases if not skipped(name)]
    plan = []
    for module, aliases in names.items():
        if isinstance(module, SparseLayer) or any(skipped(name) for name in aliases):
            continue
        if any(name.startswith(parent + ".") or not parent for name in aliases for parent, _ in dense_parents):
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
    for name, module in dense_parents:
        child = _READS_CHILD_WEIGHT[next(c for c in _READS_CHILD_WEIGHT if isinstance(module, c))]
        warnings.warn(
            f"sparsify: {name or 'model'} is an nn.{type(module).__name__}, which uses its {child}.weight "
            "directly; it stays dense", stacklevel=2,
        )
    converted = []
    try:
        for module, sparse_class in plan:
            converted.append((module, type(module)))
            sparse_class.convert_in_place(module, ste=ste, backend=backend)
    except BaseException:
        for module, dense_class in reversed(converted):
            _restore_dense(module, dense_class)
        raise
    _fast_paths_off(model, names)
    return model


def _restore_dense(module: nn.Module, dense_class: type) -> None:
    """Undo ``convert_in_place`` on ``module``, whatever part of it ran: its class and attributes as before."""
    module.__class__ = dense_class
    module._parameters.pop("threshold", None)
    for attr in ("ste", "backend"):
        module.__dict__.pop(attr, None)


def _fast_paths_off(model: nn.Module, names: dict) -> None:
    """Turn off the inference fast paths of PyTorch's transformer modules that would read a sparse child's
    weight directly (see ``sparsify``); what each module computes is its standard path's."""
    def has_sparse_linears(layer: nn.Module) -> bool:
        return isinstance(layer, nn.TransformerEncoderLayer) and any(
            isinstance(getattr(layer, child, None), SparseLayer) for child in ("linear1", "linear2"))

    for module in names:
        if has_sparse_linears(module):
            # The fast path runs only for ReLU/GELU layers, which this flag marks; the standard path calls
            # self.activation and never reads it.
            module.activation_relu_or_gelu = 0
    for module, aliases in names.items():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False) and any(
            map(has_sparse_linears, module.layers)
        ):
            module.use_nested_tensor = False
            warnings.warn(
                f"sparsify: {aliases[0] or 'model'} is an nn.TransformerEncoder of sparse layers: it no longer "
                "turns padded batches into nested tensors (that path skips the sparse layers); padded "
                "positions of its output now hold what the standard path computes, not zeros", stacklevel=3,
            )


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


def _non_finite(what: str, values: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming every entry of ``values`` that holds a NaN or infinity."""
    bad = sorted(name for name, v in values.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"{what}: non-finite values in the parameter's dtype for {bad}; nothing was changed")


@torch.no_grad()
def load_thresholds(model: nn.Module, mapping: Mapping[str, torch.Tensor]) -> None:
    """Copy ``mapping[name]`` (``[out]`` each) into every sparse layer's threshold. Raises, changing nothing,
    when a value is not finite once cast to the threshold's dtype (float64 1e300 is inf in float32)."""
    layers = _check_mapping(model, mapping, "load_thresholds")
    cast = {name: mapping[name].to(device=layer.threshold.device, dtype=layer.threshold.dtype)
            for name, layer in layers.items()}
    _non_finite("load_thresholds", cast)
    for name, layer in layers.items():
        layer.threshold.copy_(cast[name])


@torch.no_grad()
def apply_threshold_update(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """The paper's global-threshold update: ``W_i -= d_i * sign(sum_j W_ij) / n`` on every element of
    row ``i``, with ``d = tau_global_new - tau_global_old`` per layer (``delta[name]``: ``[out]``) and
    ``n = kh*kw`` for Conv2d, ``in_features`` for Linear (as the paper's code does). Raises, changing
    nothing, when a delta or an updated weight is not finite in the weight's dtype."""
    layers = _check_mapping(model, delta, "apply_threshold_update")
    updated = {}
    for name, layer in layers.items():
        w = layer.weight
        n = w.shape[1] if w.dim() == 2 else w.shape[2] * w.shape[3]
        row_sign = w.reshape(w.shape[0], -1).sum(1).sign()
        d = delta[name].to(device=w.device, dtype=w.dtype)
        _non_finite("apply_threshold_update", {name: d})
        updated[name] = w - (d * row_sign / n).view(-1, *[1] * (w.dim() - 1))
    _non_finite("apply_threshold_update (updated weights)", updated)
    for name, layer in layers.items():
        layer.weight.copy_(updated[name])


def threshold_penalty(model: nn.Module) -> torch.Tensor:
    """``sum_i exp(-tau_i)`` over every sparse layer's thresholds (a differentiable scalar)."""
    return sum((layer.threshold.neg().exp().sum() for _, layer in sparse_layers(model)), torch.zeros(()))


@torch.no_grad()
def reset_collapsed(model: nn.Module, min_density: float = 0.01) -> list[str]:
    """Zero the thresholds of every layer whose density is ``<= min_density`` (the paper's layer
    collapse guard). ``min_density``: a number in [0, 1]. Returns the names of the layers reset."""
    if isinstance(min_density, bool) or not isinstance(min_density, numbers.Real) or not 0 <= min_density <= 1:
        raise ValueError(f"reset_collapsed: min_density must be a number in [0, 1], got {min_density!r}")
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
