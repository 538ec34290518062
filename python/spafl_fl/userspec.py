"""A user's own model and data in every engine: ``--model MODULE:CALLABLE`` and ``--dataset MODULE:CALLABLE``.

- model: ``CALLABLE(num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module``, a plain model;
  the loop sparsifies it for SpaFL (``sparsify_user_model``) and trains it as it is for FedAvg and Local.
- dataset: ``CALLABLE() -> (x_train, y_train, x_test, y_test)``: float tensors ``[N, *input_shape]`` and
  integer labels ``[N]`` in ``0 .. num_classes - 1``; the loop splits them over the clients as it does the
  bundled sets (the test set with the same class proportions per client).

MODULE is imported from the current directory or the environment (``sys.path``), in every process of a run:
the Flower engines' workers get the current directory on their path (``cwd_on_path``, ``importable_env``).
Every problem is a ``ValueError`` that names the spec and what to change.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

from spafl_kernels import SparseConv2d, SparseLinear, sparsify

log = logging.getLogger("spafl_fl")

_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_spec(value) -> bool:
    """Whether ``value`` has the form ``MODULE:CALLABLE`` (``pkg.mod:build``, ``mod:Factory.make``)."""
    return isinstance(value, str) and bool(_SPEC.match(value))


def cwd_on_path() -> None:
    """The current directory on ``sys.path`` (as ``python -m`` has it), so that ``mymod:build`` is found."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def load_callable(spec: str, what: str) -> Callable:
    """The callable ``spec`` names (``MODULE:ATTR[.ATTR]``); ``what`` ("--model", "--dataset") names it in errors."""
    if not is_spec(spec):
        raise ValueError(f"{what} {spec!r} is not MODULE:CALLABLE (e.g. mymodels:build)")
    module_name, attr = spec.split(":")
    cwd_on_path()
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while it runs
        raise ValueError(f"{what} {spec}: cannot import {module_name!r} from {os.getcwd()} or the environment: "
                         f"{type(error).__name__}: {error}") from error
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what} {spec}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what} {spec}: {attr!r} is a {type(target).__name__}, not callable")
    return target


def importable_env(env: dict | None = None) -> dict:
    """``env`` (default ``os.environ``) with the current directory first on ``PYTHONPATH``: what a worker
    process (Ray, a SuperNode) needs to import the user's ``MODULE`` the way this process does."""
    env = dict(os.environ if env is None else env)
    paths = [os.getcwd(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def load_user_dataset(spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x_train, y_train, x_test, y_test, num_classes)`` from the dataset callable ``spec``, checked:
    float inputs (as float32) of one sample shape, int64 labels in ``0 .. num_classes - 1`` (num_classes:
    the largest label + 1, at least 2), finite values, at least one sample in each split."""
    what = f"--dataset {spec}"
    try:
        result = load_callable(spec, "--dataset")()
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{what}: the call failed: {type(error).__name__}: {error}") from error
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        raise ValueError(f"{what} must return (x_train, y_train, x_test, y_test), got {_describe(result)}")
    names = ("x_train", "y_train", "x_test", "y_test")
    for name, value in zip(names, result):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a torch.Tensor, got {_describe(value)}")
    x_train, y_train, x_test, y_test = result
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"{what}: {name} must be a float tensor [N, *input_shape], got {x.dtype} "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: {name} holds NaN or infinite values")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{what}: x_train samples are {tuple(x_train.shape[1:])} but x_test samples "
                         f"{tuple(x_test.shape[1:])}")
    for name, y, x in (("y_train", y_train, x_train), ("y_test", y_test, x_test)):
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"{what}: {name} must be integer labels [N], got {y.dtype} {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: {name} has {y.shape[0]} labels for {x.shape[0]} samples")
        if y.shape[0] == 0:
            raise ValueError(f"{what}: {name} is empty")
        if int(y.min()) < 0:
            raise ValueError(f"{what}: {name} holds the label {int(y.min())}; labels must be 0 .. num_classes - 1")
    num_classes = max(int(y_train.max()), int(y_test.max())) + 1
    if num_classes < 2:
        raise ValueError(f"{what}: the labels hold one class only; a classifier needs at least 2")
    return (x_train.detach().to(torch.float32).contiguous(), y_train.detach().to(torch.int64).contiguous(),
            x_test.detach().to(torch.float32).contiguous(), y_test.detach().to(torch.int64).contiguous(), num_classes)


def build_user_model(spec: str, num_classes: int, input_shape: Iterable[int]) -> nn.Module:
    """The plain model ``spec`` builds for ``num_classes`` and samples of ``input_shape``, checked: an
    ``nn.Module`` with parameters whose output for a batch of two zero samples is ``[2, num_classes]``."""
    what = f"--model {spec}"
    input_shape = tuple(int(n) for n in input_shape)
    try:
        model = load_callable(spec, "--model")(num_classes, input_shape)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{what}: the call (num_classes={num_classes}, input_shape={input_shape}) failed: "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} must return a torch.nn.Module, got {_describe(model)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{what}: the model has no trainable parameters")
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as error:
        raise ValueError(f"{what}: the model fails on a batch [2, {', '.join(map(str, input_shape))}]: "
                         f"{type(error).__name__}: {error}") from error
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what}: the model maps a batch of 2 samples to {shape}; expected logits (2, {num_classes})")
    return model


def unconvertible_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> why, for every ``nn.Linear``/``nn.Conv2d`` that ``sparsify`` cannot convert
    faithfully (subclasses with behaviour of their own, non-zero padding modes)."""
    found = {}
    for name, module in model.named_modules():
        kind = SparseLinear if isinstance(module, nn.Linear) else (
            SparseConv2d if isinstance(module, nn.Conv2d) else None)
        problem = kind.conversion_problem(module) if kind else None
        if problem and not any(name.startswith(other + ".") for other in found):
            found[name] = problem
    return found


def sparsify_user_model(model: nn.Module, *, ste: str, backend: str, skip: Iterable[str] = ()) -> nn.Module:
    """``sparsify`` for a user's model: the layers named in ``skip`` and those it cannot convert (logged
    with the reason) stay dense. Raises ``ValueError`` when no layer is left to make sparse."""
    skip = [name for name in skip if name]
    kept = unconvertible_layers(model)
    for name, why in kept.items():
        log.warning("--model: layer %s stays dense: %s", name, why)
    sparsify(model, ste=ste, backend=backend, skip=[*skip, *kept])
    if not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules()):
        raise ValueError("--model: the model has no nn.Linear or nn.Conv2d that SpaFL can make sparse")
    return model


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {value.dtype} {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
