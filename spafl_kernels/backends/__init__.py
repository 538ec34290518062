"""Backend registry and dispatch (docs/DESIGN.md §3).

``backend="auto"`` takes the first backend of ``AUTO_ORDER`` that supports the call on that device and,
on the devices a backend names in ``self_check_device_types`` (the GPU backends on CUDA), has passed its
self-check there (``spafl_kernels.selfcheck``); the environment variable ``SPAFL_BACKEND`` overrides
``auto``. An explicit backend that cannot run the call raises ``BackendNotSupportedError`` listing its
reasons.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil

import torch

from .base import Backend, CallSpec

BACKEND_NAMES = tuple(sorted(
    (module.name for module in pkgutil.iter_modules(__path__) if module.ispkg), key=lambda n: (n != "reference", n)
))
"""Every backend: each subpackage here is one (its ``BACKEND`` object), ``reference`` first, then by name. A
new backend is a new folder, and a line in ``AUTO_ORDER`` if ``auto`` may choose it."""

AUTO_ORDER = ("triton", "cpp", "torch")
"""Preference of ``backend="auto"``: fastest first (each backend also names the devices it is chosen on).
``reference`` is never chosen. ``cuda`` joins only once its GPU tests (tests/test_cuda.py) have passed on
a real GPU. On a GPU, ``triton`` (and ``cuda``) is chosen only once it passed its self-check on that device
(``spafl_kernels.selfcheck``)."""


class BackendNotSupportedError(RuntimeError):
    """No backend, or not the one asked for, can run the call; the message says why for each."""


class _Unavailable(Backend):
    """Stands in for a backend whose module failed to import; every call gets the import error."""

    has_kernels = False

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self.description = f"unavailable: {error}"
        self._reason = f"could not be imported ({type(error).__name__}: {error})"

    def not_supported_reasons(self, spec: CallSpec) -> list[str]:
        return [self._reason]  # nothing else can be known of a backend that did not import


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend object called ``name``; ``ValueError`` for an unknown name."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__).BACKEND
    except ImportError as error:  # e.g. triton not installed: the rest of the library still works
        return _Unavailable(name, error)


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, op: str, device_type: str, dtype: torch.dtype, groups: int) -> str:
    """Name of the backend that serves this call (``backend`` may be ``"auto"``).

    Runs once at trace time under ``torch.compile``: the choice depends only on these constants.
    """
    spec = CallSpec(op, device_type, dtype, groups)
    if backend == "auto":
        backend = os.environ.get("SPAFL_BACKEND", "auto") or "auto"
    if backend != "auto":
        reasons = get_backend(backend).not_supported_reasons(spec)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {backend!r} cannot run {spec}: " + "; ".join(reasons)
            )
        return backend
    skipped = []
    for name in AUTO_ORDER:
        candidate = get_backend(name)
        reasons = candidate.not_supported_reasons(spec)
        if device_type not in candidate.auto_device_types:
            reasons = reasons + [f"not chosen automatically on {device_type}"]
        if not reasons and device_type in candidate.self_check_device_types:
            from ..selfcheck import untrusted_reasons  # it runs the ops, which import this module

            reasons = untrusted_reasons(name, device_type)
        if not reasons:
            return name
        skipped.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(f"no backend can run {spec}:\n  " + "\n  ".join(skipped))
