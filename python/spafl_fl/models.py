"""The models a run trains: the paper's (LeNet-5, Conv4, half-width ResNet-18, ViT, MLP; defined in
``spafl_kernels.zoo``, which the layer and model benchmarks use too) or a user's ``MODULE:CALLABLE``
(``userspec``), sparsified here for SpaFL."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spafl_kernels.zoo import MODELS
from spafl_kernels.zoo import build_model as build_zoo_model

from .userspec import build_user_model, is_spec, sparsify_user_model

__all__ = ["MODELS", "build_model"]


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    sparse: bool = True,
    ste: str = "identity",
    backend: str = "auto",
    seed: int | None = None,
    skip: Iterable[str] = (),
    dense_classifier: bool = False,
) -> nn.Module:
    """Model ``name`` (one of ``MODELS`` or ``MODULE:CALLABLE``) for inputs ``[B, *input_shape]``; ``seed``
    fixes the initialisation (the same seed gives the sparse and the dense model the same weights).
    ``sparse``: a user's model is sparsified with ``ste`` and ``backend``, the layers in ``skip`` and those
    ``sparsify`` cannot convert staying dense; the paper's models are built from sparse layers (``skip``
    must be empty: they keep the paper's dense layers by construction; ``dense_classifier`` keeps their
    last Linear dense too)."""
    skip = [s for s in skip if s]
    if not is_spec(name):
        if skip:
            raise ValueError(f"skip names layers of a --model MODULE:CALLABLE; {name} keeps the paper's dense layers")
        return build_zoo_model(name, input_shape, num_classes, sparse=sparse, ste=ste, backend=backend, seed=seed,
                               dense_classifier=dense_classifier)
    if seed is not None:
        torch.manual_seed(seed)
    model = build_user_model(name, num_classes, input_shape)
    return sparsify_user_model(model, ste=ste, backend=backend, skip=skip) if sparse else model
