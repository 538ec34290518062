"""The ``cpp`` backend: C++ CPU kernels (``csrc/cpu``, OpenMP) that skip pruned rows.

Dense work runs through ATen (MKL BLAS, oneDNN) on compact panels of the active rows; scores, masks
and index lists come from one fused pass over the weight. float32 and float64 on the CPU; needs the
compiled extension ``spafl_kernels._C``.
"""

from __future__ import annotations

import torch

from ..._ext import NativeKernels
from ...paths import load_cache_once
from ..base import Backend


class CppBackend(NativeKernels, Backend):
    """The CPU implementation of the ``spafl::native_*`` ops (``csrc/cpu``)."""

    name = "cpp"
    description = "C++ CPU kernels (OpenMP + ATen BLAS/oneDNN on compact row panels); float32/float64"
    devices = ("cpu",)
    auto_device_types = ("cpu",)
    dtypes = (torch.float32, torch.float64)
    needs_extension = True
    checks_threshold = True  # in the score pass (csrc/cpu/rows.cpp row_scores)


BACKEND = CppBackend()
load_cache_once()  # replay this machine's timed path choices (spafl_kernels.paths)
