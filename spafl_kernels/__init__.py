"""spafl-kernels: structured-sparse SpaFL layers whose kernels skip pruned rows.

Three tiers: the functional ops (``sparse_linear``, ``sparse_conv2d``), the modules (``SparseLinear``,
``SparseConv2d``) and whole models (``sparsify``, the threshold helpers, and ``export_dense``: a trained sparse
model as a smaller plain PyTorch model).
"""

from ._version import __version__
from .backends import AUTO_ORDER, BACKEND_NAMES, BackendNotSupportedError
from .export import ExportReport, export_dense, export_dense_with_report
from .functional import sparse_conv2d, sparse_linear
from .modules import SparseConv2d, SparseLinear
from .semantics import STES
from .whole_model import (
    apply_threshold_update,
    density,
    load_thresholds,
    reset_collapsed,
    sparse_layers,
    sparsify,
    threshold_penalty,
    thresholds,
)

__all__ = [
    "__version__",
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "STES",
    "BackendNotSupportedError",
    "ExportReport",
    "SparseConv2d",
    "SparseLinear",
    "apply_threshold_update",
    "density",
    "export_dense",
    "export_dense_with_report",
    "load_thresholds",
    "reset_collapsed",
    "sparse_conv2d",
    "sparse_layers",
    "sparse_linear",
    "sparsify",
    "threshold_penalty",
    "thresholds",
]
