"""Tolerant loading of the compiled extension ``spafl_kernels._C``.

Importing the package never fails for a missing build; code that needs the extension calls
``require_extension()``, which raises with the command that fixes it. ``NativeKernels`` binds the
extension's ops as the kernels of the ``cpp`` and ``cuda`` backends.
"""

from __future__ import annotations

import torch

BUILD_HINT = "pip install --no-build-isolation .   (from the repository root; see README 'Building')"

try:
    from . import _C  # noqa: F401  (registers the schemas and kernels of the native torch.ops.spafl ops)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # built with SPAFL_SKIP_EXT=1, no compiler, or an ABI mismatch
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"


def extension_available() -> bool:
    return EXTENSION_ERROR is None


def require_extension() -> None:
    """Raise ``RuntimeError`` naming the import error and the fix when ``_C`` is not built."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(
            f"spafl_kernels._C is not available ({EXTENSION_ERROR}); build it with: {BUILD_HINT}"
        )


def _native_op(name: str):
    """``torch.ops.spafl.native_<name>``; without the extension, a function raising ``require_extension``'s
    error (dispatch never calls it: the native backends declare ``needs_extension``)."""
    if EXTENSION_ERROR is None:
        return getattr(torch.ops.spafl, f"native_{name}")

    def missing(*args):
        require_extension()

    return staticmethod(missing)


class NativeKernels:
    """The ``Kernels`` of the ``cpp`` and ``cuda`` backends: the ``spafl::native_*`` ops themselves (one
    schema, csrc/spafl.cpp), whose CPU implementation is csrc/cpu and CUDA implementation csrc/cuda."""

    linear_fwd = _native_op("linear_fwd")
    linear_bwd = _native_op("linear_bwd")
    conv2d_fwd = _native_op("conv2d_fwd")
    conv2d_bwd = _native_op("conv2d_bwd")
