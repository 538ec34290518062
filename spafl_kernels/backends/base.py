"""What a backend is: a name, the inputs it can serve, and the kernels behind the ``spafl`` ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CallSpec:
    """What dispatch knows of a call before any work: enough to decide which backend can serve it."""

    op: str  # "linear" or "conv2d"
    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    groups: int = 1

    def __str__(self) -> str:
        extra = f", groups={self.groups}" if self.op == "conv2d" else ""
        return f"{self.op}({self.device_type}, {str(self.dtype).removeprefix('torch.')}{extra})"


class Backend:
    """Base class of the kernel backends (everything except ``reference``).

    A backend implements, for each op it serves, two functions that the ``torch.ops.spafl`` ops call
    (shapes for Linear; Conv2d adds ``stride, padding, dilation, groups``):

    - ``linear_fwd(x[M, K], weight[N, K], bias[N]|None, threshold[N]) -> (y[M, N], score[N])``
    - ``linear_bwd(grad_y[M, N], x, weight, bias, score, ste, need_dx, need_params)
      -> (dx[M, K], dweight[N, K], dbias[N], dthreshold[N])``, with an empty tensor in place of
      every gradient not asked for (``dx`` unless ``need_dx``; the rest unless ``need_params``;
      ``dbias`` when ``bias`` is None).

    ``score`` is in ``semantics.acc_dtype(weight.dtype)``. Nothing else is saved: ``dL/dm_i`` comes
    from the weight gradient, ``<G_i, W_i> + b_i * sum(g_i)``, which backward computes anyway for
    active rows, so no output is kept alive (in-place ops on ``y`` stay legal, memory stays dense's).
    """

    name: str = ""
    description: str = ""
    auto_device_types: tuple[str, ...] = ()
    """Devices on which ``backend="auto"`` may choose this backend."""

    def not_supported_reasons(self, spec: CallSpec) -> list[str]:
        """Why this backend cannot serve ``spec`` (empty when it can)."""
        raise NotImplementedError
