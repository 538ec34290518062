"""Functional API: ``sparse_linear`` and ``sparse_conv2d``.

Both validate every input before any work (once per call signature: ``_checked``), resolve ``backend``
(``"auto"``, ``SPAFL_BACKEND``) and call the ``torch.ops.spafl`` ops (``ops.sparse_op``), or, for
``backend="reference"``, the masked-dense oracle under autograd.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import ops  # registers torch.ops.spafl.*
from .backends import get_backend, resolve_backend
from .semantics import STE_CODES, Conv2dGeometry, check_ste

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_params(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor
) -> None:
    """Device, dtype and threshold checks shared by both ops; raises with the argument's name."""
    tensors = {"x": x, "weight": weight, "bias": bias, "threshold": threshold}
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: weight must be a floating tensor ({_FLOAT_DTYPES}), got {weight.dtype}")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != weight.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but weight has {weight.dtype}; they must match")
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}; they must match")
    n_rows = weight.shape[0]
    if threshold.shape != (n_rows,):
        raise ValueError(
            f"{op}: threshold must have shape ({n_rows},) (one per weight row), got {tuple(threshold.shape)}"
        )
    if bias is not None and bias.shape != (n_rows,):
        raise ValueError(f"{op}: bias must have shape ({n_rows},), got {tuple(bias.shape)}")


def _check_threshold_finite(op: str, threshold: torch.Tensor, backend: str) -> None:
    """Raise for a NaN or infinite threshold. A backend whose kernels check it in their score pass
    (``Backend.checks_threshold``: no extra pass over the threshold) is left to do so; elsewhere (and in
    traced graphs) a device-side assertion, which on CUDA never synchronises with the host and on the CPU
    raises."""
    if torch.compiler.is_compiling() or not get_backend(backend).checks_threshold:
        torch._assert_async(torch.isfinite(threshold).all(), f"{op}: threshold has non-finite values (nan or inf)")


def _without_autocast(fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor, *args, **kwargs):
    """``fn(x, weight, *args, **kwargs)`` with autocast off and a floating ``x`` cast to the weight's dtype.

    Under ``torch.autocast`` a sparse layer computes in its parameters' dtype, as autocast's float32 ops do:
    the mask then comes from the parameters as they are (what ``mask()`` and ``density()`` report), and the
    output's dtype never depends on which rows are pruned, on every backend alike."""
    with torch.autocast(x.device.type, enabled=False):
        return fn(x.to(weight.dtype) if x.is_floating_point() else x, weight, *args, **kwargs)


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    *,
    ste: str = "identity",
    backend: str = "auto",
) -> torch.Tensor:
    """SpaFL Linear: ``y = x @ (m * W).T + m * b`` with ``m_i = 1[mean|W_i| - tau_i > 0]``.

    x: ``[*, K]``; weight: ``[N, K]``; bias: ``[N]`` or None; threshold: ``[N]``. Returns ``[*, N]``;
    pruned outputs are exactly 0. ``ste`` picks the straight-through gate (``semantics.STES``). Under
    ``torch.autocast`` it computes in the weight's dtype (``x`` is cast to it).
    """
    if ops.autocast_on(x) and isinstance(weight, torch.Tensor):
        return _without_autocast(sparse_linear, x, weight, bias, threshold, ste=ste, backend=backend)
    name = _checked(_check_linear, "linear", ste, backend, (x, weight, bias, threshold))
    _check_threshold_finite("sparse_linear", threshold, name)
    if name == "reference":
        return get_backend(name).sparse_linear(x, weight, bias, threshold, ste)
    flat = x.dim() == 2  # the common case: no reshapes (each costs a few microseconds per call)
    y = ops.sparse_op(
        "linear", x if flat else x.reshape(-1, x.shape[-1]), weight, bias, threshold, STE_CODES[ste], name
    )
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


def _check_linear(x, weight, bias, threshold, ste: str, backend: str) -> str:
    """Raises for an invalid ``sparse_linear`` call; returns the backend that serves it."""
    check_ste(ste)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"sparse_linear: weight must be 2-D [out_features, in_features], got {_shape(weight)}")
    _check_params("sparse_linear", x, weight, bias, threshold)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"sparse_linear: x must have shape (*, {weight.shape[1]}) (in_features last), got {tuple(x.shape)}"
        )
    return resolve_backend(backend, "linear", weight.device.type, weight.dtype, 1)


# Call keys already checked -> what the checks returned. The checks cost ~10 us of Python per call, as
# much as a small dense layer's forward, and a model repeats the same few calls every step.
_CHECKED: dict[tuple, Any] = {}
_CHECKED_MAX = 4096  # entries; emptied when full (a new batch shape is a new key)


_ENVIRON = os.environ
_ENVIRON_DATA = getattr(os.environ, "_data", None)  # CPython's raw mapping behind os.environ
_BACKEND_KEY = os.environ.encodekey("SPAFL_BACKEND") if _ENVIRON_DATA is not None else None


def _backend_setting():
    """``SPAFL_BACKEND`` as a call key reads it (the raw value or None). ``os.environ.get`` encodes the name
    and, while it is unset, raises and catches a KeyError (1.4 us per call); the raw mapping behind it
    answers in ~0.1 us and follows every change made through ``os.environ``."""
    if _ENVIRON_DATA is None or os.environ is not _ENVIRON:
        return os.environ.get("SPAFL_BACKEND")
    return _ENVIRON_DATA.get(_BACKEND_KEY)


def _call_key(op: str, ste, backend, tensors: tuple, *constants) -> tuple | None:
    """Everything the checks of a call read: its op, ``ste``, ``backend``, ``SPAFL_BACKEND`` (read only for
    ``"auto"``, as the checks do), the type, dtype, device and shape of x, weight, bias (or None) and threshold
    (``tensors``), flat (a nested key costs more to build and hash than a small layer's score pass), and the
    ``repr`` of each constant (so ``1``, ``1.0`` and ``True`` differ). None when an argument is no tensor
    (the checks then run, and raise)."""
    env = _backend_setting() if backend == "auto" else None
    try:
        x, weight, bias, threshold = tensors
        return (
            op, ste, backend, env, type(x), x.dtype, x.device, x.shape, type(weight), weight.dtype, weight.device,
            weight.shape, None if bias is None else (type(bias), bias.dtype, bias.device, bias.shape),
            type(threshold), threshold.dtype, threshold.device, threshold.shape, *map(repr, constants),
        )
    except AttributeError:
        return None


def _checked(check: Callable[..., Any], op: str, ste, backend, tensors: tuple, *constants) -> Any:
    """``check(*tensors, *constants, ste, backend)``'s result, run once per call key (``_call_key`` of the
    same arguments) and remembered; ``check`` raises for invalid input, and nothing is remembered then. Under
    ``torch.compile`` it always runs (once, at trace time)."""
    if torch.compiler.is_compiling():
        return check(*tensors, *constants, ste, backend)
    key = _call_key(op, ste, backend, tensors, *constants)
    if key is None:
        return check(*tensors, *constants, ste, backend)
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable ste or backend: the checks say what is wrong
        return check(*tensors, *constants, ste, backend)
    result = check(*tensors, *constants, ste, backend)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = result
    return result


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a 2-tuple."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"sparse_conv2d: {name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def conv2d_padding(
    padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(symmetric, extra)`` padding per dimension (height, width).

    ``"same"`` needs ``d*(k-1)`` padding in total; when that is odd, PyTorch puts the extra pixel at
    the bottom/right, so ``extra`` holds it and the caller pads ``x`` by it before the op.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"sparse_conv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"sparse_conv2d: padding='same' needs stride 1, got stride={stride}")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return (total[0] // 2, total[1] // 2), (total[0] % 2, total[1] % 2)
    return _pair(padding, "padding", 0), (0, 0)


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    ste: str = "identity",
    backend: str = "auto",
) -> torch.Tensor:
    """SpaFL Conv2d: ``conv2d(x, m * W) + m * b`` with one mask bit per filter.

    x: ``[B, C, H, W]``; weight: ``[N, C/groups, kh, kw]``; bias: ``[N]`` or None; threshold: ``[N]``.
    Returns ``[B, N, H', W']``. ``stride``/``dilation``: int or pair; ``padding``: int, pair, ``"same"``
    or ``"valid"``, as in ``F.conv2d``. Under ``torch.autocast`` it computes in the weight's dtype.
    """
    if ops.autocast_on(x) and isinstance(weight, torch.Tensor):
        return _without_autocast(sparse_conv2d, x, weight, bias, threshold, stride, padding, dilation, groups,
                                 ste=ste, backend=backend)
    name, geometry, extra = _checked(
        _check_conv2d, "conv2d", ste, backend, (x, weight, bias, threshold), stride, padding, dilation, groups
    )
    if extra != (0, 0):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    _check_threshold_finite("sparse_conv2d", threshold, name)
    if name == "reference":
        stride, padding, dilation, groups = Conv2dGeometry.of(geometry)
        return get_backend(name).sparse_conv2d(
            x, weight, bias, threshold, stride, padding, dilation, groups, ste
        )
    return ops.sparse_op("conv2d", x, weight, bias, threshold, list(geometry), STE_CODES[ste], name)


def _check_conv2d(
    x, weight, bias, threshold, stride, padding, dilation, groups, ste: str, backend: str
) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """Raises for an invalid ``sparse_conv2d`` call; returns the backend that serves it, the flat
    geometry (``Conv2dGeometry.flat``) and the extra bottom/right padding of an odd ``"same"``."""
    check_ste(ste)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"sparse_conv2d: weight must be 4-D [out, in/groups, kh, kw], got {_shape(weight)}")
    _check_params("sparse_conv2d", x, weight, bias, threshold)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"sparse_conv2d: groups must be a positive int, got {groups!r}")
    n_rows, group_in = weight.shape[:2]
    if n_rows % groups:
        raise ValueError(f"sparse_conv2d: out_channels ({n_rows}) must be divisible by groups ({groups})")
    if x.dim() != 4 or x.shape[1] != group_in * groups:
        raise ValueError(
            f"sparse_conv2d: x must have shape (B, {group_in * groups}, H, W) "
            f"(weight.shape[1] * groups channels), got {tuple(x.shape)}"
        )
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    kernel = tuple(weight.shape[2:])
    padding, extra = conv2d_padding(padding, kernel, stride, dilation)
    for dim, name in ((0, "height"), (1, "width")):
        size = x.shape[2 + dim] + extra[dim]
        if size + 2 * padding[dim] < dilation[dim] * (kernel[dim] - 1) + 1:
            raise ValueError(
                f"sparse_conv2d: padded input {name} ({size} + 2*{padding[dim]}) is smaller "
                f"than the dilated kernel ({dilation[dim] * (kernel[dim] - 1) + 1})"
            )
    name = resolve_backend(backend, "conv2d", weight.device.type, weight.dtype, groups)
    return name, tuple(Conv2dGeometry(stride, padding, dilation, groups).flat()), extra
