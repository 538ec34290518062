"""The ``cpp`` backend: C++ CPU kernels (``csrc/cpu``, OpenMP) that skip pruned rows.

Dense work runs through ATen (MKL BLAS, oneDNN) on compact panels of the active rows; scores, masks
and index lists come from one fused pass over the weight. float32 and float64 on the CPU; needs the
compiled extension ``spafl_kernels._C``.
"""

from __future__ import annotations

import torch

from ..._ext import BUILD_HINT, EXTENSION_ERROR
from ..base import Backend, CallSpec
from .conv2d import conv2d_bwd, conv2d_fwd
from .linear import linear_bwd, linear_fwd

DTYPES = (torch.float32, torch.float64)


class CppBackend(Backend):
    name = "cpp"
    description = "C++ CPU kernels (OpenMP + ATen BLAS/oneDNN on compact row panels); float32/float64"
    auto_device_types = ("cpu",)

    linear_fwd = staticmethod(linear_fwd)
    linear_bwd = staticmethod(linear_bwd)
    conv2d_fwd = staticmethod(conv2d_fwd)
    conv2d_bwd = staticmethod(conv2d_bwd)

    def not_supported_reasons(self, spec: CallSpec) -> list[str]:
        reasons = []
        if EXTENSION_ERROR is not None:
            reasons.append(f"the C++ extension is not built ({EXTENSION_ERROR}); build it with: {BUILD_HINT}")
        if spec.device_type != "cpu":
            reasons.append(f"runs on the CPU only, not {spec.device_type}")
        if spec.dtype not in DTYPES:
            reasons.append(f"supports float32 and float64, not {str(spec.dtype).removeprefix('torch.')}")
        return reasons


BACKEND = CppBackend()
