"""The ``torch.ops.spafl`` operators: schemas, fake (meta) kernels and autograd formulas.

Each op takes the name of a concrete backend (already resolved, never ``"auto"``) and calls that
backend's kernel; ``functional.py`` validates inputs and resolves the backend before calling them.

- ``spafl::linear_fwd(x[M, K], weight[N, K], bias[N]?, threshold[N], ste, backend) -> (y[M, N], score[N])``
- ``spafl::linear_bwd(grad_y, x, weight, bias?, score, ste, need_dx, need_params, backend)
  -> (dx, dweight, dbias, dthreshold)``
- ``spafl::conv2d_fwd`` / ``spafl::conv2d_bwd``: the same with ``geometry`` (``int[7]``,
  ``semantics.Conv2dGeometry.flat()``) after the tensors; x ``[B, C, H, W]``, y ``[B, N, H', W']``.

``ste`` is a code of ``semantics.STE_CODES``. The backward ops are ops too, with fake kernels, so
``torch.compile`` traces the backward graph. The ``spafl::native_*`` ops (the ``cpp`` and ``cuda``
kernels, csrc/spafl.cpp) have the same schemas without ``backend`` and share these fake kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ._ext import extension_available
from .backends import get_backend
from .backends.base import Kernels
from .semantics import Conv2dGeometry, acc_dtype

_any_autocast = torch._C._is_any_autocast_enabled


def autocast_on(x) -> bool:
    """Whether ``torch.autocast`` is on for the device of tensor ``x`` (never for devices autocast does not
    know, such as meta)."""
    if not _any_autocast():  # the common case, in one call
        return False
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def kernels_of(name: str) -> Kernels:
    """The kernels of backend ``name``; ``ValueError`` for a backend without kernels (``reference``)."""
    backend = get_backend(name)
    if not backend.has_kernels:
        raise ValueError(
            f"backend {name!r} has no kernels ({backend.description}); the ops take a kernel backend, and "
            "sparse_linear/sparse_conv2d(..., backend='reference') runs the oracle"
        )
    return backend  # type: ignore[return-value]  (a backend with kernels implements Kernels)

# ---------------------------------------------------------------------------------------- linear


@torch.library.custom_op("spafl::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Tensor, ste: int, backend: str
) -> tuple[Tensor, Tensor]:
    """``ste`` is unused in the forward pass; it is an input so that autograd can save it."""
    return kernels_of(backend).linear_fwd(x, weight, bias, threshold)


def _fake_score(weight: Tensor) -> Tensor:
    return weight.new_empty(weight.shape[0], dtype=acc_dtype(weight.dtype))


def _fake_linear_fwd(x, weight, bias, threshold, *_):
    """Fake kernel of ``linear_fwd`` and ``native_linear_fwd`` (``*_``: ``ste, backend`` or nothing)."""
    return x.new_empty(x.shape[0], weight.shape[0]), _fake_score(weight)


@torch.library.custom_op("spafl::linear_bwd", mutates_args=())
def linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    score: Tensor,
    ste: int,
    need_dx: bool,
    need_params: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels_of(backend).linear_bwd(
        grad_y, x, weight, bias, score, ste, need_dx, need_params
    )


def _fake_grads(x, weight, bias, need_dx, need_params):
    """Shapes of ``(dx, dweight, dbias, dthreshold)``, empty where not asked for."""
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    if not need_params:  # distinct empty tensors: op outputs must not alias each other
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dbias = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return dx, torch.empty_like(weight), dbias, weight.new_empty(weight.shape[0])


def _fake_linear_bwd(grad_y, x, weight, bias, score, ste, need_dx, need_params, *_):
    """Fake kernel of ``linear_bwd`` and ``native_linear_bwd`` (``*_``: ``backend`` or nothing)."""
    return _fake_grads(x, weight, bias, need_dx, need_params)


# ---------------------------------------------------------------------------------------- conv2d


@torch.library.custom_op("spafl::conv2d_fwd", mutates_args=())
def conv2d_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Tensor, geometry: Sequence[int], ste: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernels_of(backend).conv2d_fwd(x, weight, bias, threshold, geometry)


def _fake_conv2d_fwd(x, weight, bias, threshold, geometry, *_):
    """Fake kernel of ``conv2d_fwd`` and ``native_conv2d_fwd`` (``*_``: ``ste, backend`` or nothing)."""
    out_hw = Conv2dGeometry.of(geometry).output_hw(x.shape[2:], weight.shape[2:])
    return x.new_empty(x.shape[0], weight.shape[0], *out_hw), _fake_score(weight)


@torch.library.custom_op("spafl::conv2d_bwd", mutates_args=())
def conv2d_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    score: Tensor,
    geometry: Sequence[int],
    ste: int,
    need_dx: bool,
    need_params: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels_of(backend).conv2d_bwd(grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params)


def _fake_conv2d_bwd(grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params, *_):
    """Fake kernel of ``conv2d_bwd`` and ``native_conv2d_bwd`` (``*_``: ``backend`` or nothing)."""
    return _fake_grads(x, weight, bias, need_dx, need_params)


FAKE_KERNELS = {"linear_fwd": _fake_linear_fwd, "linear_bwd": _fake_linear_bwd,
                "conv2d_fwd": _fake_conv2d_fwd, "conv2d_bwd": _fake_conv2d_bwd}
"""The fake kernels by op name (shapes and dtypes only): for the op that dispatches to a backend, for the
native op, and for the ``torch`` backend on meta tensors."""

for _name, _fake in FAKE_KERNELS.items():
    globals()[_name].register_fake(_fake)
    if extension_available():
        torch.library.register_fake(f"spafl::native_{_name}", _fake)


# -------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    """Shared by both ops: inputs start ``(x, weight, bias, threshold)``; the rest are constants."""
    x, weight, bias, threshold, *constants = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.constants = constants  # linear: (ste, backend); conv2d: (geometry, ste, backend)
    ctx.mark_non_differentiable(output[1])


def _needs(ctx) -> tuple[bool, bool]:
    """``(need_dx, need_params)`` from which of ``x, weight, bias, threshold`` need gradients."""
    return ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])


def _as_input_grads(ctx, grads, n_constants):
    dx, dweight, dbias, dthreshold = grads
    need = ctx.needs_input_grad
    has_bias = ctx.saved_tensors[2] is not None
    return (
        dx if need[0] else None,
        dweight if need[1] else None,
        dbias if need[2] and has_bias else None,
        dthreshold if need[3] else None,
        *([None] * n_constants),
    )


def _backward(ctx, grad_y, grad_score):
    """Autograd formula of both ops: ``<op>_bwd`` on the saved tensors and constants."""
    x, weight, bias, score = ctx.saved_tensors
    *geometry, ste, backend = ctx.constants
    bwd = torch.ops.spafl.conv2d_bwd if geometry else torch.ops.spafl.linear_bwd
    grads = bwd(grad_y.contiguous(), x, weight, bias, score, *geometry, ste, *_needs(ctx), backend)
    return _as_input_grads(ctx, grads, len(ctx.constants))


linear_fwd.register_autograd(_backward, setup_context=_setup_context)
conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ eager path


class _EagerSparseOp(torch.autograd.Function):
    """The ``<op>_fwd`` op and its autograd formula as a plain ``autograd.Function`` calling the same
    backend kernels. Eager calls of the Python backends (and of the native ones under forward-mode AD
    or ``torch.func``) take it: the custom-op dispatch costs more per forward+backward than the whole
    dense layer on the paper's small models.
    Inputs: ``(x, weight, bias, threshold, op, *constants)`` with the op's constants (linear: ste,
    backend; conv2d: geometry, ste, backend)."""

    # The old forward(ctx, ...) style on purpose: with a separate setup_context, every apply() binds its
    # arguments through inspect.signature, which costs more than a small layer's forward. torch.func
    # transforms then refuse it with PyTorch's own error.
    @staticmethod
    def forward(ctx, x, weight, bias, threshold, op, *constants):
        *geometry, _, backend = constants
        y, score = getattr(kernels_of(backend), f"{op}_fwd")(x, weight, bias, threshold, *geometry)
        _setup_context(ctx, (x, weight, bias, threshold, *constants), (y, score))
        ctx.op = op
        return y, score

    @staticmethod
    def jvp(ctx, *tangents):
        feature = "forward-mode AD (torch.autograd.forward_ad, torch.func.jvp)"
        raise RuntimeError(_unsupported(feature, ctx.constants[-1], _NO_TRANSFORMS))

    @staticmethod
    def backward(ctx, grad_y, grad_score):
        x, weight, bias, score = ctx.saved_tensors
        *geometry, ste, backend = ctx.constants
        # The kernels are not differentiable: under create_graph=True they run without autograd and
        # their results refuse a second backward with a clear error instead of returning zeros. Nor do they
        # autocast (a backward called inside torch.autocast): they compute in the forward's dtype.
        no_autocast = torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext()
        with torch.no_grad(), no_autocast:
            grads = getattr(kernels_of(backend), f"{ctx.op}_bwd")(
                grad_y.contiguous(), x, weight, bias, score, *geometry, ste, *_needs(ctx)
            )
        input_grads = _as_input_grads(ctx, grads, 1 + len(ctx.constants))
        if torch.is_grad_enabled():  # create_graph=True: tie the gradients to what they depend on
            n = len(input_grads)
            input_grads = _NoDoubleBackward.apply(backend, n, *input_grads, grad_y, x, weight, bias, score)[:n]
        return input_grads


_NO_TRANSFORMS = "no spafl backend supports torch.func transforms; call the layer in a loop instead"


def _unsupported(feature: str, backend: str, instead: str) -> str:
    return f"spafl: backend {backend!r} does not support {feature}: its kernels give first derivatives " \
        f"through backward() only; {instead}"


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a backward pass's ``n`` gradients through; differentiating them again raises. Their
    true inputs (``grad_y`` and the saved tensors) come along, so that the gradients require grad
    exactly when a second derivative could flow, and reach this backward instead of reading 0. The C++
    autograd node of the native backends has its twin (csrc/autograd.cpp), in the same words."""

    @staticmethod
    def forward(ctx, backend, n, *tensors):
        ctx.backend = backend
        return tuple(None if g is None else g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_unsupported(
            "double backward (create_graph=True, hessians, gradient penalties)", ctx.backend,
            "backend='reference' (masked dense under plain autograd) gives higher derivatives",
        ))


def _native_autograd(backend: str) -> bool:
    """Whether this eager call can take the native backends' C++ autograd node (csrc/autograd.cpp):
    ``backend`` runs the native ops, and no forward-mode AD or ``torch.func`` transform is active (the
    node has neither; the Python path refuses them with this package's errors)."""
    return (
        get_backend(backend).needs_extension
        and torch.autograd.forward_ad._current_level < 0
        and not torch._C._are_functorch_transforms_active()
    )


def sparse_op(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Tensor, *constants) -> Tensor:
    """``torch.ops.spafl.<op>_fwd(x, weight, bias, threshold, *constants)``'s ``y``, with autograd.

    Under ``torch.compile`` this is the op itself (traceable, fake kernels). In eager mode it is the same
    computation without the custom-op dispatch: for the native backends (``cpp``, ``cuda``) one C++
    autograd node, ``torch.ops.spafl.native_<op>`` (no Python in forward or backward); for the others
    ``_EagerSparseOp``."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.spafl, f"{op}_fwd")(x, weight, bias, threshold, *constants)[0]
    if _native_autograd(constants[-1]):
        native = _NATIVE_OPS.get(op)
        if native is None:  # looked up once: torch.ops' attribute lookup and packet call cost per call
            native = _NATIVE_OPS[op] = getattr(torch.ops.spafl, f"native_{op}").default
        return native(x, weight, bias, threshold, *constants[:-1])
    return _EagerSparseOp.apply(x, weight, bias, threshold, op, *constants)[0]


_NATIVE_OPS: dict[str, torch._ops.OpOverload] = {}
"""``torch.ops.spafl.native_<op>.default`` by op name, once used."""
