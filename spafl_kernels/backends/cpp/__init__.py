"""The ``cpp`` backend: C++ CPU kernels (``csrc/cpu``, OpenMP) that skip pruned rows.

Dense work runs through ATen (MKL BLAS, oneDNN) on compact panels of the active rows; scores, masks
and index lists come from one fused pass over the weight. float32 and float64 on the CPU; needs the
compiled extension ``spafl_kernels._C``.
"""

from __future__ import annotations

import torch

from ..base import Backend
from .conv2d import conv2d_bwd, conv2d_fwd
from .linear import linear_bwd, linear_fwd


class CppBackend(Backend):
    name = "cpp"
    description = "C++ CPU kernels (OpenMP + ATen BLAS/oneDNN on compact row panels); float32/float64"
    devices = ("cpu",)
    auto_device_types = ("cpu",)
    dtypes = (torch.float32, torch.float64)
    needs_extension = True

    linear_fwd = staticmethod(linear_fwd)
    linear_bwd = staticmethod(linear_bwd)
    conv2d_fwd = staticmethod(conv2d_fwd)
    conv2d_bwd = staticmethod(conv2d_bwd)


BACKEND = CppBackend()
