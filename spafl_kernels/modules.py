"""Drop-in modules: ``SparseLinear`` and ``SparseConv2d``.

They subclass ``nn.Linear``/``nn.Conv2d`` (same parameters, init and state-dict keys, plus
``threshold``), so code that inspects layers keeps working.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .backends import BACKEND_NAMES
from .functional import sparse_conv2d, sparse_linear
from .semantics import check_ste, is_active, row_score


def check_backend(backend: str) -> str:
    """Return ``backend`` unchanged, or raise ``ValueError`` naming the accepted values."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


class SparseLayer:
    """What both sparse modules add to their dense parent: a threshold per row, the STE and backend."""

    weight: nn.Parameter
    threshold: nn.Parameter

    def _init_sparse(self, ste: str, backend: str) -> None:
        self.ste = check_ste(ste)
        self.backend = check_backend(backend)
        rows = self.weight.shape[0]
        self.threshold = nn.Parameter(
            torch.zeros(rows, device=self.weight.device, dtype=self.weight.dtype)
        )

    @property
    def fan_in(self) -> int:
        """Elements per weight row (``semantics.fan_in``; 0 for a layer without rows)."""
        return self.weight[0].numel() if self.weight.shape[0] else 0

    @torch.no_grad()
    def active_rows(self) -> torch.Tensor:
        """``[out]`` bool: which rows are active now (``semantics.row_score`` > 0, as every backend decides)."""
        return is_active(row_score(self.weight, self.threshold))

    def mask(self) -> torch.Tensor:
        """0/1 ``[out]`` tensor in the weight's dtype: which rows are active now."""
        return self.active_rows().to(self.weight.dtype)

    def density(self) -> float:
        """Fraction of active rows (1.0 for a layer without rows); counted exactly, whatever the dtype."""
        rows = self.weight.shape[0]
        return int(self.active_rows().sum()) / rows if rows else 1.0

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward dispatches to this package's "
            "Python backends, which TorchScript does not support; use torch.compile, or run the model eagerly"
        )

    # The dense class each sparse module converts from; set by the subclasses.
    _dense_class: type[nn.Module]

    @classmethod
    def conversion_problem(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot become this sparse class in place, or None when it can."""
        base = type(module)
        if parametrize.is_parametrized(module):
            base = base.__bases__[0]  # parametrize's generated subclass of the module's own class
        if base is not cls._dense_class:
            return (f"it is a {base.__qualname__}, a subclass of nn.{cls._dense_class.__name__} whose own "
                    "behaviour a sparse layer would drop")
        return None

    @classmethod
    def convert_in_place(cls, module: nn.Module, *, ste: str = "identity", backend: str = "auto") -> nn.Module:
        """Make ``module`` (a plain ``nn.Linear``/``nn.Conv2d``, possibly parametrized) an instance of
        this class without copying anything: the same object, parameters, hooks and parametrizations,
        plus a ``threshold`` (zeros, trainable iff the weight is). Returns ``module``."""
        problem = cls.conversion_problem(module)
        if problem:
            raise TypeError(f"{cls.__name__}.convert_in_place: {problem}")
        check_ste(ste)  # before the class changes: a bad argument leaves the module as it was
        check_backend(backend)
        module.__class__ = _parametrized_twin(cls, type(module)) if parametrize.is_parametrized(module) else cls
        module._init_sparse(ste, backend)
        module.threshold.requires_grad_(module.weight.requires_grad)
        return module

    @torch.no_grad()
    def _copy_dense(self, module: nn.Module):
        """Copy ``module``'s weight and bias into this layer; returns ``self``."""
        self.weight.copy_(module.weight)
        if module.bias is not None:
            self.bias.copy_(module.bias)
        return self

    def _sparse_repr(self) -> str:
        text = f"ste={self.ste!r}, backend={self.backend!r}"
        if self.weight.device.type != "meta":
            text += f", density={self.density():.3f}"
        return text


def _parametrized_twin(sparse_class: type, parametrized_class: type) -> type:
    """The class of a parametrized module turned sparse: a subclass of ``sparse_class`` carrying what
    ``torch.nn.utils.parametrize`` put on the module's own generated class (the properties that compute
    ``weight``). One per module, as parametrize makes them: ``remove_parametrizations`` deletes those
    properties from it and, once none is left, restores its first base, a plain ``sparse_class``."""
    own = {k: v for k, v in vars(parametrized_class).items() if k not in ("__dict__", "__weakref__", "__doc__")}
    return type(f"Parametrized{sparse_class.__name__}", (sparse_class,), own)


class SparseLinear(SparseLayer, nn.Linear):
    """Linear layer whose output neurons are pruned by trainable thresholds (SpaFL).

    Input ``[*, in_features]`` -> output ``[*, out_features]``; pruned outputs are exactly 0.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ste: str = "identity",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_sparse(ste, backend)

    _dense_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.bias, self.threshold, ste=self.ste, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._sparse_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Linear, **kwargs) -> SparseLinear:
        """A ``SparseLinear`` with ``module``'s shape, weight and bias; ``kwargs``: ``ste``, ``backend``."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        w = module.weight
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        return layer._copy_dense(module)


class SparseConv2d(SparseLayer, nn.Conv2d):
    """Conv2d whose filters are pruned by trainable thresholds (SpaFL).

    Input ``[B, in_channels, H, W]`` -> output ``[B, out_channels, H', W']``; pruned channels are 0.
    Only ``padding_mode="zeros"`` exists.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        *,
        ste: str = "identity",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, device=device, dtype=dtype)
        self._init_sparse(ste, backend)

    _dense_class = nn.Conv2d

    @classmethod
    def conversion_problem(cls, module: nn.Module) -> str | None:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            return f"padding_mode={module.padding_mode!r}; SparseConv2d has 'zeros' only"
        return super().conversion_problem(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x, self.weight, self.bias, self.threshold, self.stride, self.padding,
                             self.dilation, self.groups, ste=self.ste, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._sparse_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Conv2d, **kwargs) -> SparseConv2d:
        """A ``SparseConv2d`` with ``module``'s geometry, weight and bias; ``kwargs``: ``ste``, ``backend``."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense needs an nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(
                f"SparseConv2d supports padding_mode='zeros' only, got {module.padding_mode!r}; "
                "leave this layer dense (sparsify(..., skip=[name]))"
            )
        w = module.weight
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        return layer._copy_dense(module)
