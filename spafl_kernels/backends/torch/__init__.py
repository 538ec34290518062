"""The ``torch`` backend: plain PyTorch gather/compute/scatter. Runs on every device and dtype
PyTorch's own ops run on; counting active rows synchronises with the device."""

from __future__ import annotations

import torch

from ..base import Backend, CallSpec
from .conv2d import conv2d_bwd, conv2d_fwd
from .linear import linear_bwd, linear_fwd


class TorchBackend(Backend):
    name = "torch"
    description = "gather active rows, dense PyTorch op on them, scatter; runs anywhere, syncs per layer"
    auto_device_types = ("cpu", "cuda", "mps", "xpu", "meta")  # meta: shapes only

    linear_fwd = staticmethod(linear_fwd)
    linear_bwd = staticmethod(linear_bwd)
    conv2d_fwd = staticmethod(conv2d_fwd)
    conv2d_bwd = staticmethod(conv2d_bwd)

    def extra_reasons(self, spec: CallSpec) -> list[str]:
        if spec.dtype == torch.float16 and spec.device_type == "cpu" and spec.op == "conv2d":
            return ["float16 convolution is slow or missing on the CPU in PyTorch; use bfloat16"]
        return []


BACKEND = TorchBackend()
