"""What a backend is: a name, the inputs it can serve (declared as class attributes, checked by one
``not_supported_reasons``), and, for the kernel backends, the kernels behind the ``spafl`` ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from .._ext import BUILD_HINT, EXTENSION_ERROR

YScore = tuple[Tensor, Tensor]
"""``(y, score)``."""
Grads = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(dx, dweight, dbias, dthreshold)``."""

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CallSpec:
    """What dispatch knows of a call before any work: enough to decide which backend can serve it."""

    op: str  # "linear" or "conv2d"
    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    groups: int = 1

    def __str__(self) -> str:
        extra = f", groups={self.groups}" if self.op == "conv2d" else ""
        return f"{self.op}({self.device_type}, {dtype_name(self.dtype)}{extra})"


class Kernels(Protocol):
    """The kernels a kernel backend gives the ``torch.ops.spafl`` ops, with their schemas less ``backend``
    (ops.py). Conv2d takes x ``[B, C, H, W]``, weight ``[N, C/groups, kh, kw]``, y ``[B, N, H', W']`` and
    ``geometry`` after the tensors (``int[7]``: ``semantics.Conv2dGeometry.flat()``):

    - ``linear_fwd(x[M, K], weight[N, K], bias[N]|None, threshold[N]) -> (y[M, N], score[N])``
    - ``linear_bwd(grad_y[M, N], x, weight, bias, score, ste, need_dx, need_params)
      -> (dx[M, K], dweight[N, K], dbias[N], dthreshold[N])``, with an empty tensor in place of
      every gradient not asked for (``dx`` unless ``need_dx``; the rest unless ``need_params``;
      ``dbias`` when ``bias`` is None); no two outputs alias each other.

    ``ste`` is a code of ``semantics.STE_CODES``. ``score`` is in ``semantics.acc_dtype(weight.dtype)``.
    Nothing else is saved: ``dL/dm_i`` comes from the weight gradient, ``<G_i, W_i> + b_i * sum(g_i)``,
    which backward computes anyway for active rows, so no output is kept alive (in-place ops on ``y``
    stay legal, memory stays dense's).
    """

    def linear_fwd(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Tensor) -> YScore: ...

    def linear_bwd(self, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], score: Tensor,
                   ste: int, need_dx: bool, need_params: bool) -> Grads: ...

    def conv2d_fwd(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Tensor,
                   geometry: Sequence[int]) -> YScore: ...

    def conv2d_bwd(self, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], score: Tensor,
                   geometry: Sequence[int], ste: int, need_dx: bool, need_params: bool) -> Grads: ...


class Backend:
    """A backend as dispatch sees it. Subclasses declare what they serve in the class attributes below;
    ``not_supported_reasons`` turns them into reasons, in one wording for every backend, and adds what
    ``extra_reasons`` says (what no attribute can say: a build without CUDA, Triton's interpreter). Kernel
    backends (``has_kernels``) also implement ``Kernels``; ``reference`` does not: it is the oracle."""

    name: str = ""
    description: str = ""
    has_kernels: bool = True
    """Whether the backend implements ``Kernels`` (every backend but ``reference``)."""
    devices: Optional[tuple[str, ...]] = None
    """Device types it runs on; ``None``: every device PyTorch runs on."""
    auto_device_types: tuple[str, ...] = ()
    """Devices on which ``backend="auto"`` may choose this backend."""
    self_check_device_types: tuple[str, ...] = ()
    """Devices on which ``auto`` chooses it only once its self-check (``spafl_kernels.selfcheck``) passed there:
    where CI cannot run it (the GPU backends on CUDA)."""
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    needs_extension: bool = False
    """Whether it runs the compiled extension ``spafl_kernels._C``."""
    supports_groups: bool = True
    """Whether it runs grouped convolutions (``groups > 1``)."""
    checks_threshold: bool = False
    """Whether its kernels raise for a non-finite threshold themselves (else ``functional`` asserts it)."""

    def extra_reasons(self, spec: CallSpec) -> list[str]:
        """Reasons beyond what the class attributes say."""
        return []

    def not_supported_reasons(self, spec: CallSpec) -> list[str]:
        """Why this backend cannot serve ``spec`` (empty when it can)."""
        reasons = []
        if self.needs_extension and EXTENSION_ERROR is not None:
            reasons.append(f"spafl_kernels._C is not available ({EXTENSION_ERROR}); build it with: {BUILD_HINT}")
        if self.devices is not None and spec.device_type not in self.devices:
            reasons.append(f"runs on {' or '.join(self.devices)} tensors only, not {spec.device_type}")
        reasons += self.extra_reasons(spec)
        if spec.dtype not in self.dtypes:
            supported = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype {dtype_name(spec.dtype)} is not supported ({supported})")
        if spec.op == "conv2d" and spec.groups != 1 and not self.supports_groups:
            reasons.append(f"grouped convolution (groups={spec.groups}) is not implemented")
        return reasons
