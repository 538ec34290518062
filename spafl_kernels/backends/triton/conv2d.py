"""Triton sparse Conv2d: implicit GEMMs over the active (forward, dX) or graded (dW) filters.

Shapes: x ``[B, C, H, W]``, weight ``[N, C/groups, KH, KW]``, y ``[B, N, OH, OW]``; any strides (NCHW and
channels_last alike), stride, padding, dilation and groups. GEMM view of the forward pass: ``M = B*OH*OW``
output positions, ``N/groups`` filters per group, reduction over ``fan_in = C/groups*KH*KW``; the
unfolded input tile is gathered from x inside the loads, never materialised. The filter lists come per
group from ``rows.compact`` (on the device); grids cover every filter and programs past a group's
count exit, or zero-fill their pruned output channels in the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...semantics import conv2d_output_hw
from .rows import (
    compact,
    dot_options,
    gemm_configs,
    launch_grid,
    mma,
    param_grads,
    reduction_split,
    row_score,
    rows_dense,
)

GEMM_CONFIGS = gemm_configs()


@triton.jit
def _unfold_k(k, channels_per_group, KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Reduction index -> (input channel within the group, kernel row, kernel column). With
    ``CHANNELS_LAST`` the channel varies fastest, so consecutive k read consecutive memory of x."""
    if CHANNELS_LAST:
        c = k % channels_per_group
        tap = k // channels_per_group
        kh = tap // KW
        kw = tap % KW
    else:
        kw = k % KW
        kh = (k // KW) % KH
        c = k // (KH * KW)
    return c, kh, kw


@triton.jit
def _positions(m, OH, OW):
    """Flat output (or input) position -> (batch, row, column)."""
    col = m % OW
    rest = m // OW
    return rest // OH, rest % OH, col


@triton.jit
def _unfolded_x(
    x_ptr, b, oh, ow, m_in, c, kh, kw, k_in, H, W,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, stride_xb, stride_xc, stride_xh, stride_xw,
):
    """The ``[positions, reduction]`` tile of the unfolded input (zero in the padding): x at batch b,
    channel c, row ``oh*stride - pad + kh*dil``, column likewise."""
    ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
    iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
    inside = m_in[:, None] & k_in[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_ptr + (b.to(tl.int64) * stride_xb)[:, None] + (c * stride_xc)[None, :] + ih * stride_xh + iw * stride_xw
    return tl.load(ptrs, mask=inside, other=0.0)


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "fan_in"])
@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, rows_ptr, count_ptr,
    M, H, W, OH, OW, rows_per_group, channels_per_group, fan_in,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wc, stride_wh, stride_ww,
    stride_yb, stride_yn, stride_yh, stride_yw,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[:, rows[p]] = conv(x_group, W[rows[p]]) + b[rows[p]] for a group's list positions
    ``p < count[group]``, 0 for its pruned filters. Grid: ``(cdiv(M, BLOCK_M), cdiv(rows_per_group,
    BLOCK_N), groups)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    count = tl.load(count_ptr + group)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + group * rows_per_group + offs_p, mask=offs_p < rows_per_group, other=0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    b, oh, ow = _positions(offs_m, OH, OW)
    y_ptrs = (y_ptr + (b.to(tl.int64) * stride_yb + oh * stride_yh + ow * stride_yw)[:, None]
              + rows[None, :] * stride_yn)
    y_mask = m_in[:, None] & (offs_p < rows_per_group)[None, :]
    if pid_n * BLOCK_N >= count:  # a tile of pruned filters only: zeros, no GEMM
        tl.store(y_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty), mask=y_mask)
        return
    live = offs_p < count  # pruned filters at the tile's end load zero weights: their outputs come out 0
    x_group = x_ptr + group * channels_per_group * stride_xc
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, fan_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < fan_in
        c, kh, kw = _unfold_k(k, channels_per_group, KH, KW, CHANNELS_LAST)
        a = _unfolded_x(x_group, b, oh, ow, m_in, c, kh, kw, k_in, H, W, stride_h, stride_w, pad_h, pad_w,
                        dil_h, dil_w, stride_xb, stride_xc, stride_xh, stride_xw)
        w_offs = c * stride_wc + kh * stride_wh + kw * stride_ww
        w = tl.load(w_rows[None, :] + w_offs[:, None], mask=live[None, :] & k_in[:, None], other=0.0)
        acc = mma(acc, a, w, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=live, other=0.0).to(acc.dtype)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "channels_per_group"])
@triton.jit
def _conv2d_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, rows_ptr, count_ptr,
    M, H, W, OH, OW, rows_per_group, channels_per_group,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gb, stride_gn, stride_gh, stride_gw,
    stride_wn, stride_wc, stride_wh, stride_ww,
    stride_dxb, stride_dxc, stride_dxh, stride_dxw,
    KH: tl.constexpr, KW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[b, c, ih, iw] = sum over the group's active filters n and taps (kh, kw) of
    g[b, n, oh, ow] * W[n, c, kh, kw], where ``ih = oh*stride - pad + kh*dil`` (likewise iw).
    ``M = B*H*W`` input positions; BLOCK_K tiles the group's channels, BLOCK_N the filters.
    Grid: ``(cdiv(M, BLOCK_M), cdiv(channels_per_group, BLOCK_K), groups)``."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    group = tl.program_id(2)
    count = tl.load(count_ptr + group)
    first = group * rows_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    b, ih, iw = _positions(offs_m, H, W)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    c_in = offs_c < channels_per_group
    g_batch = g_ptr + b.to(tl.int64) * stride_gb
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        # The output pixel this tap reaches from (ih, iw), where one exists.
        hit = (m_in & (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0)
               & (oh < OH) & (ow < OW))
        g_pos = g_batch + oh * stride_gh + ow * stride_gw
        w_tap = w_ptr + kh * stride_wh + kw * stride_ww + offs_c * stride_wc
        for p0 in range(0, count, BLOCK_N):
            offs_p = p0 + tl.arange(0, BLOCK_N)
            live = offs_p < count
            rows = tl.load(rows_ptr + first + offs_p, mask=live, other=0)
            a = tl.load(g_pos[:, None] + rows[None, :] * stride_gn, mask=hit[:, None] & live[None, :], other=0.0)
            w = tl.load(w_tap[None, :] + rows[:, None].to(tl.int64) * stride_wn,
                        mask=live[:, None] & c_in[None, :], other=0.0)
            acc = mma(acc, a, w, PRECISION, UPCAST)
    channels = group * channels_per_group + offs_c
    dx_ptrs = (dx_ptr + (b.to(tl.int64) * stride_dxb + ih * stride_dxh + iw * stride_dxw)[:, None]
               + (channels * stride_dxc)[None, :])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_in[:, None] & c_in[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "fan_in"])
@triton.jit
def _conv2d_bwd_dw_kernel(
    g_ptr, x_ptr, gw_ptr, gsum_ptr, rows_ptr, count_ptr,
    M, H, W, OH, OW, n_rows, rows_per_group, channels_per_group, fan_in, n_split, m_chunk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gb, stride_gn, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wc, stride_wh, stride_ww, stride_gws,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw[s, rows[p], :] = weight gradient of filter rows[p] over slice ``s`` of the output positions
    (``m_chunk`` of them), for a group's graded list positions ``p < count[group]``, stored in W's
    in-row element order (W's strides ``stride_wc/wh/ww``); with ``HAS_BIAS`` also gsum[s, rows[p]] =
    sum of g over the slice. Grid: ``(cdiv(rows_per_group, BLOCK_N), cdiv(fan_in, BLOCK_K),
    groups * n_split)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    group = tl.program_id(2) // n_split
    split = tl.program_id(2) % n_split
    count = tl.load(count_ptr + group)
    if pid_n * BLOCK_N >= count:
        return
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    live = offs_p < count
    rows = tl.load(rows_ptr + group * rows_per_group + offs_p, mask=live, other=0)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = k < fan_in
    c, kh, kw = _unfold_k(k, channels_per_group, KH, KW, CHANNELS_LAST)
    x_group = x_ptr + group * channels_per_group * stride_xc
    m_start = split * m_chunk
    m_stop = tl.minimum(m_start + m_chunk, M)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    gsum = tl.zeros([BLOCK_N], dtype=acc.dtype)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_stop
        b, oh, ow = _positions(offs_m, OH, OW)
        g_offs = b.to(tl.int64) * stride_gb + oh * stride_gh + ow * stride_gw
        a = tl.load(g_ptr + g_offs[None, :] + rows[:, None] * stride_gn, mask=live[:, None] & m_in[None, :], other=0.0)
        xs = _unfolded_x(x_group, b, oh, ow, m_in, c, kh, kw, k_in, H, W, stride_h, stride_w, pad_h, pad_w,
                         dil_h, dil_w, stride_xb, stride_xc, stride_xh, stride_xw)
        acc = mma(acc, a, xs, PRECISION, UPCAST)
        if HAS_BIAS:
            gsum += tl.sum(a.to(acc.dtype), 1)
    in_row = c * stride_wc + kh * stride_wh + kw * stride_ww
    gw_rows = gw_ptr + split * stride_gws + rows.to(tl.int64) * fan_in
    tl.store(gw_rows[:, None] + in_row[None, :], acc, mask=live[:, None] & k_in[None, :])
    if HAS_BIAS:
        if pid_k == 0:  # one program per row tile writes the row sums
            tl.store(gsum_ptr + split * n_rows + rows, gsum, mask=live)


def _tf32() -> bool:
    """Whether torch lets float32 convolutions use tf32 (``torch.backends.cudnn.allow_tf32``)."""
    return torch.backends.cudnn.allow_tf32


def _geometry(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> dict:
    """Size and geometry arguments the kernels share, by name."""
    out_h, out_w = conv2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    n_rows = weight.shape[0]
    return {
        "H": x.shape[2], "W": x.shape[3], "OH": out_h, "OW": out_w,
        "rows_per_group": n_rows // groups, "channels_per_group": x.shape[1] // groups,
        "stride_h": stride[0], "stride_w": stride[1], "pad_h": padding[0], "pad_w": padding[1],
        "dil_h": dilation[0], "dil_w": dilation[1], "KH": weight.shape[2], "KW": weight.shape[3],
    }


def _strides(prefix: str, t: Tensor, dims: str) -> dict:
    """Strides of a 4-D tensor as kernel arguments ``stride_<prefix><dim>``: e.g. ``_strides("x", x,
    "bchw")`` -> ``stride_xb, stride_xc, stride_xh, stride_xw``."""
    return {f"stride_{prefix}{dim}": step for dim, step in zip(dims, t.stride())}


def _channels_last(x: Tensor) -> bool:
    """Whether x's channels are its innermost dimension (then the reduction runs channel-fastest)."""
    return x.stride(1) == 1 and x.shape[1] > 1


@torch.library.triton_op("spafl::triton_conv2d_fwd", mutates_args=())
def conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    threshold: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[Tensor, Tensor]:
    """x: ``[B, C, H, W]``, weight: ``[N, C/groups, kh, kw]`` -> ``(y [B, N, OH, OW] contiguous, score [N])``."""
    weight = rows_dense(weight)
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    score = row_score(weight, threshold)
    active, count, _, _ = compact(score, groups, None)
    n_rows = weight.shape[0]
    y = x.new_empty(x.shape[0], n_rows, geo["OH"], geo["OW"])
    m = x.shape[0] * geo["OH"] * geo["OW"]
    grid = launch_grid((m, "BLOCK_M"), (geo["rows_per_group"], "BLOCK_N"), groups)
    torch.library.wrap_triton(_conv2d_fwd_kernel)[grid](
        x, weight, bias, y, active, count, m, fan_in=weight[0].numel(),
        **geo, **_strides("x", x, "bchw"), **_strides("w", weight, "nchw"), **_strides("y", y, "bnhw"),
        CHANNELS_LAST=_channels_last(x), HAS_BIAS=bias is not None, **dot_options(x.dtype, _tf32()),
    )
    return y, score


@torch.library.triton_op("spafl::triton_conv2d_bwd", mutates_args=())
def conv2d_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    score: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    ste: str,
    need_dx: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``conv2d_fwd`` (see ``backends.base.Backend``); grad_y: ``[B, N, OH, OW]``."""
    weight = rows_dense(weight)
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    active, count, graded, graded_count = compact(score, groups, ste if need_params else None)
    options = dot_options(x.dtype, _tf32())
    w_strides = _strides("w", weight, "nchw")
    empty = x.new_empty(0)
    dx = empty
    if need_dx:
        dx = torch.empty_like(x)
        m = x.shape[0] * geo["H"] * geo["W"]
        grid = launch_grid((m, "BLOCK_M"), (geo["channels_per_group"], "BLOCK_K"), groups)
        torch.library.wrap_triton(_conv2d_bwd_dx_kernel)[grid](
            grad_y, weight, dx, active, count, m,
            **geo, **_strides("g", grad_y, "bnhw"), **w_strides, **_strides("dx", dx, "bchw"), **options,
        )
    if not need_params:
        return dx, empty, empty, empty
    n_rows, fan_in = weight.shape[0], weight[0].numel()
    m = x.shape[0] * geo["OH"] * geo["OW"]
    split = reduction_split(m, n_rows, fan_in, x.device)
    gw = torch.empty(split, n_rows, fan_in, device=x.device, dtype=score.dtype)
    gsum = torch.empty(split, n_rows, device=x.device, dtype=score.dtype) if bias is not None else empty
    grid = launch_grid((geo["rows_per_group"], "BLOCK_N"), (fan_in, "BLOCK_K"), groups * split)
    torch.library.wrap_triton(_conv2d_bwd_dw_kernel)[grid](
        grad_y, x, gw, gsum, graded, graded_count, m, n_rows=n_rows, fan_in=fan_in, n_split=split,
        m_chunk=triton.cdiv(m, split), **geo, **_strides("g", grad_y, "bnhw"), **_strides("x", x, "bchw"),
        **w_strides, stride_gws=gw.stride(0),
        CHANNELS_LAST=_channels_last(x), HAS_BIAS=bias is not None, **options,
    )
    return (dx, *param_grads(weight, bias, score, gw, gsum, ste))
