"""The ``reference`` backend: masked dense with the STE as an autograd Function (the paper's code).

It is the test oracle: autograd differentiates it, so it does not go through the ``spafl`` ops and
shares none of their backward code. ``backend="auto"`` never picks it.
"""

from __future__ import annotations

from ..base import Backend
from .conv2d import sparse_conv2d
from .linear import sparse_linear


class ReferenceBackend(Backend):
    name = "reference"
    description = "masked dense + STE autograd Function (paper's code); the test oracle; no skipping"
    has_kernels = False  # autograd differentiates it: it gives whole layers, not the ops' kernels

    sparse_linear = staticmethod(sparse_linear)
    sparse_conv2d = staticmethod(sparse_conv2d)


BACKEND = ReferenceBackend()
