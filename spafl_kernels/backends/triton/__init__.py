"""The ``triton`` backend: fused Triton kernels that skip pruned rows, with no host synchronisation.

Scores, masks and the active-row lists are computed on the device; every grid is sized for all rows
and programs past the active count exit, so a training step can be captured in a CUDA graph. The
backend functions run inside the ``spafl`` ops, which ``torch.compile`` treats as opaque (their fake
kernels give the shapes), so the kernels launch directly, not through ``triton_op``/``wrap_triton``.

Importing this module needs ``triton``; without it the registry reports the import error instead.
On the CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before import),
which is how CI tests them.
"""

from __future__ import annotations

import torch

from ..base import FLOAT_DTYPES, Backend, CallSpec
from .conv2d import conv2d_bwd, conv2d_fwd
from .linear import linear_bwd, linear_fwd
from .rows import INTERPRET


class TritonBackend(Backend):
    name = "triton"
    description = (
        "fused Triton kernels: indexed GEMM (Linear), implicit GEMM (Conv2d); no host sync"
        + (" [TRITON_INTERPRET=1: Triton's CPU interpreter]" if INTERPRET else "")
    )
    devices = ("cpu", "cuda")
    auto_device_types = ("cuda",)
    self_check_device_types = ("cuda",)  # CI runs it in an interpreter or emulation only
    dtypes = FLOAT_DTYPES

    linear_fwd = staticmethod(linear_fwd)
    linear_bwd = staticmethod(linear_bwd)
    conv2d_fwd = staticmethod(conv2d_fwd)
    conv2d_bwd = staticmethod(conv2d_bwd)

    def extra_reasons(self, spec: CallSpec) -> list[str]:
        if spec.device_type == "cpu" and not INTERPRET:
            return [
                "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                "spafl_kernels (slow; meant for testing)"
            ]
        if spec.device_type == "cuda" and not torch.cuda.is_available():
            return ["CUDA is not available to torch"]
        return []


BACKEND = TritonBackend()
