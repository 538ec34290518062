"""The ``cuda`` backend: hand-written CUDA kernels (``csrc/cuda``) that skip pruned rows.

Scores, the mask and the compaction of active rows run on the device and the active count never
reaches the host: grids are sized for every row and blocks past the count exit, so a layer makes no
host synchronisation and can be captured in a CUDA graph. Linear runs as gather-fused GEMMs (tensor
cores for float16/bfloat16 with float32 accumulation; exact FMA for float32/float64, as PyTorch's
default matmul without TF32), Conv2d (``groups=1``) as implicit GEMM.

Not in ``AUTO_ORDER`` until its GPU tests (``tests/test_cuda.py``) have passed on a real GPU: select it
with ``backend="cuda"`` or ``SPAFL_BACKEND=cuda``.
"""

from __future__ import annotations

import torch

from ..._ext import BUILD_HINT, EXTENSION_ERROR
from ..base import Backend, CallSpec
from . import _fake  # noqa: F401  (fake kernels of the spafl::cuda_* ops)
from .conv2d import conv2d_bwd, conv2d_fwd
from .linear import linear_bwd, linear_fwd

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
"""The tensor-core kernels are built for sm_80+ (bfloat16 wmma); older devices are refused."""

NO_CUDA_BUILD = (
    "spafl_kernels._C was built without CUDA (torch.version.cuda is None or CUDA_HOME unset); "
    f"rebuild against a CUDA build of torch with the CUDA toolkit: {BUILD_HINT}"
)


def has_cuda_kernels() -> bool:
    """Whether the installed ``spafl_kernels._C`` carries the CUDA kernels (setup.py built ``csrc/cuda``)."""
    return EXTENSION_ERROR is None and torch.ops.spafl.cuda_linear_fwd.default.has_kernel_for_dispatch_key("CUDA")


def build_reasons() -> list[str]:
    """Why this install cannot run the CUDA kernels at all (empty when it can)."""
    if EXTENSION_ERROR is not None:
        return [f"spafl_kernels._C is not available ({EXTENSION_ERROR}); build it with: {BUILD_HINT}"]
    if not has_cuda_kernels():
        return [NO_CUDA_BUILD]
    return []


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA kernels (csrc/cuda): device-side row selection, gather-fused GEMM, no host sync"
    auto_device_types = ("cuda",)

    linear_fwd = staticmethod(linear_fwd)
    linear_bwd = staticmethod(linear_bwd)
    conv2d_fwd = staticmethod(conv2d_fwd)
    conv2d_bwd = staticmethod(conv2d_bwd)

    def not_supported_reasons(self, spec: CallSpec) -> list[str]:
        reasons = build_reasons()
        if spec.device_type != "cuda":
            reasons.append(f"needs CUDA tensors, got {spec.device_type} tensors")
        elif torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability()
            reasons.append(f"needs compute capability >= 8.0 (sm_80), the current device has {major}.{minor}")
        if spec.dtype not in DTYPES:
            reasons.append(f"dtype {spec.dtype} is not supported (float32, float64, float16, bfloat16)")
        if spec.op == "conv2d" and spec.groups != 1:
            reasons.append(f"grouped convolution (groups={spec.groups}) is not implemented; use backend='torch'")
        return reasons


BACKEND = CudaBackend()
