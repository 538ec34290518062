"""Fake (meta) kernels of the ``spafl::cuda_*`` ops (schemas: ``csrc/cuda_schemas.cpp``), so that
``torch.compile`` traces them and ``opcheck`` compares against them. The schemas exist in every build of
``spafl_kernels._C``, with or without CUDA."""

from __future__ import annotations

import torch

from ..._ext import extension_available
from ...semantics import acc_dtype, conv2d_output_hw


def _score(weight):
    return weight.new_empty(weight.shape[0], dtype=acc_dtype(weight.dtype))


def _grads(x, weight, bias, need_dx, need_params):
    """``(dx, dweight, dbias, dthreshold)``; each gradient not computed is its own empty tensor, as in
    ``csrc/cuda/bindings.cpp`` (the schemas declare no aliasing between outputs)."""

    def none():
        return x.new_empty(0)

    dx = torch.empty_like(x) if need_dx else none()
    if not need_params:
        return dx, none(), none(), none()
    dbias = none() if bias is None else torch.empty_like(bias)
    return dx, torch.empty_like(weight), dbias, weight.new_empty(weight.shape[0])


if extension_available():

    @torch.library.register_fake("spafl::cuda_linear_fwd")
    def _(x, weight, bias, threshold):
        return x.new_empty(x.shape[0], weight.shape[0]), _score(weight)

    @torch.library.register_fake("spafl::cuda_linear_bwd")
    def _(grad_y, x, weight, bias, score, ste, need_dx, need_params):
        return _grads(x, weight, bias, need_dx, need_params)

    @torch.library.register_fake("spafl::cuda_conv2d_fwd")
    def _(x, weight, bias, threshold, stride, padding, dilation):
        out_hw = conv2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return x.new_empty(x.shape[0], weight.shape[0], *out_hw), _score(weight)

    @torch.library.register_fake("spafl::cuda_conv2d_bwd")
    def _(grad_y, x, weight, bias, score, stride, padding, dilation, ste, need_dx, need_params):
        return _grads(x, weight, bias, need_dx, need_params)
