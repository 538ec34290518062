"""Tolerant loading of the compiled extension ``spafl_kernels._C``.

Importing the package never fails for a missing build; code that needs the extension calls
``require_extension()``, which raises with the command that fixes it.
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


if EXTENSION_ERROR is None:

    # The `cpp` backend's kernels (float32/float64: the score is in the weight's dtype).
    def _fake_grads(x, weight, bias, need_dx, need_params):
        empty = x.new_empty(0)
        dx = torch.empty_like(x) if need_dx else empty
        if not need_params:
            return dx, empty, empty, empty
        dbias = empty if bias is None else torch.empty_like(bias)
        return dx, torch.empty_like(weight), dbias, weight.new_empty(weight.shape[0])

    @torch.library.register_fake("spafl::cpp_linear_fwd")
    def _(x, weight, bias, threshold):
        return x.new_empty(x.shape[0], weight.shape[0]), weight.new_empty(weight.shape[0])

    @torch.library.register_fake("spafl::cpp_linear_bwd")
    def _(grad_y, x, weight, bias, score, ste, need_dx, need_params):
        return _fake_grads(x, weight, bias, need_dx, need_params)

    @torch.library.register_fake("spafl::cpp_conv2d_fwd")
    def _(x, weight, bias, threshold, stride, padding, dilation, groups):
        from .semantics import conv2d_output_hw

        out_hw = conv2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return x.new_empty(x.shape[0], weight.shape[0], *out_hw), weight.new_empty(weight.shape[0])

    @torch.library.register_fake("spafl::cpp_conv2d_bwd")
    def _(grad_y, x, weight, bias, score, stride, padding, dilation, groups, ste, need_dx, need_params):
        return _fake_grads(x, weight, bias, need_dx, need_params)

