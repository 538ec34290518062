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

from ..._ext import BUILD_HINT, EXTENSION_ERROR, NativeKernels
from ..base import FLOAT_DTYPES, Backend, CallSpec

MIN_CAPABILITY = (8, 0)
"""The tensor-core kernels are built for sm_80+ (bfloat16 wmma); older devices are refused."""

NO_CUDA_BUILD = (
    "spafl_kernels._C was built without CUDA (torch.version.cuda is None or CUDA_HOME unset); "
    f"rebuild against a CUDA build of torch with the CUDA toolkit: {BUILD_HINT}"
)


def has_cuda_kernels() -> bool:
    """Whether the installed ``spafl_kernels._C`` carries the CUDA kernels (setup.py built ``csrc/cuda``)."""
    return EXTENSION_ERROR is None and torch.ops.spafl.native_linear_fwd.default.has_kernel_for_dispatch_key("CUDA")


class CudaBackend(NativeKernels, Backend):
    """The CUDA implementation of the ``spafl::native_*`` ops (``csrc/cuda/bindings.cpp``)."""

    name = "cuda"
    description = "CUDA kernels (csrc/cuda): device-side row selection, gather-fused GEMM, no host sync"
    devices = ("cuda",)
    auto_device_types = ("cuda",)
    self_check_device_types = ("cuda",)  # CI runs it in an interpreter or emulation only
    dtypes = FLOAT_DTYPES
    needs_extension = True
    supports_groups = False

    def extra_reasons(self, spec: CallSpec) -> list[str]:
        if EXTENSION_ERROR is None and not has_cuda_kernels():
            return [NO_CUDA_BUILD]
        if spec.device_type == "cuda" and torch.cuda.is_available():
            if torch.cuda.get_device_capability() < MIN_CAPABILITY:
                major, minor = torch.cuda.get_device_capability()
                return [f"needs compute capability >= 8.0 (sm_80), the current device has {major}.{minor}"]
        return []


BACKEND = CudaBackend()
