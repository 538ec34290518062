"""Triton sparse Conv2d: implicit GEMMs over the active (forward, dX) or graded (dW) filters.

Shapes: x ``[B, C, H, W]``, weight ``[N, C/groups, KH, KW]``, y ``[B, N, OH, OW]``; any strides (NCHW and
channels_last alike), stride, padding, dilation and groups. GEMM view of the forward pass: ``M = B*OH*OW``
output positions, ``N/groups`` filters per group, reduction over ``fan_in = C/groups*KH*KW`` taken as
(kernel tap, chunk of channels); the unfolded input tile is gathered from x inside the loads, never
materialised. The filter lists come per
group from ``rows.compact`` (on the device); grids cover every filter and programs past a group's
count exit, or zero-fill their pruned output channels in the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...semantics import Conv2dGeometry
from .rows import (
    SIZE_ARGS,
    compact,
    dense_vector,
    dot_options,
    gemm_configs,
    launch_grid,
    mma,
    param_grads,
    reduction_split,
    row_scores,
    row_sums,
    rows_dense,
)

GEMM_CONFIGS = gemm_configs()


@triton.jit
def _positions(m, OH, OW):
    """Flat position -> (batch, row, column) in an ``OH x OW`` plane."""
    col = m % OW
    rest = m // OW
    return rest // OH, rest % OH, col


@triton.jit
def _tap(step, n_chunks, KW: tl.constexpr, BLOCK: tl.constexpr):
    """Step of a flattened (kernel tap, chunk) loop -> (kernel row, kernel column, chunk start)."""
    tap = step // n_chunks
    return tap // KW, tap % KW, (step % n_chunks) * BLOCK


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "channels_per_group"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, rows_ptr, count_ptr,
    M, H, W, OH, OW, rows_per_group, channels_per_group,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wc, stride_wh, stride_ww,
    stride_yb, stride_yn, stride_yh, stride_yw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[:, rows[p]] = conv(x_group, W[rows[p]]) + b[rows[p]] for a group's list positions
    ``p < count[group]``, 0 for its pruned filters. ``M = B*OH*OW > 0`` output positions; the reduction
    runs over (tap, channel chunk of BLOCK_K) in one flat loop, so the padding mask is per position,
    not per element. Grid: ``(cdiv(M, BLOCK_M), cdiv(rows_per_group, BLOCK_N), groups)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    count = tl.load(count_ptr + group)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + group * rows_per_group + offs_p, mask=offs_p < rows_per_group, other=0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_n * BLOCK_N >= count:  # a tile of pruned filters only: zeros, no GEMM
        _store_nchw(y_ptr, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), offs_m, rows, offs_p < rows_per_group,
                    M, OH, OW, stride_yb, stride_yn, stride_yh, stride_yw)
        return
    # Out-of-range positions wrap onto real ones, pruned filters at the tile's end are computed like
    # the others; the epilogue discards both.
    b, oh, ow = _positions(offs_m % M, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_pos = x_ptr + group * channels_per_group * stride_xc + b.to(tl.int64) * stride_xb
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    offs_c = tl.arange(0, BLOCK_K)
    n_chunks = tl.cdiv(channels_per_group, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64 if ACC64 else tl.float32)
    for step in range(0, KH * KW * n_chunks):
        kh, kw, c0 = _tap(step, n_chunks, KW, BLOCK_K)
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_in = offs_c < channels_per_group - c0
        channels = c0 + offs_c
        a = tl.load((x_pos + ih * stride_xh + iw * stride_xw)[:, None] + (channels * stride_xc)[None, :],
                    mask=inside[:, None] & c_in[None, :], other=0.0)
        w = tl.load((w_rows + kh * stride_wh + kw * stride_ww)[None, :] + (channels * stride_wc)[:, None],
                    mask=c_in[:, None], other=0.0)
        acc = mma(acc, a, w, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(acc.dtype)[None, :]
    acc = tl.where((offs_p < count)[None, :], acc, 0.0)  # pruned: exactly 0, whatever their weights hold
    _store_nchw(y_ptr, acc, offs_m, rows, offs_p < rows_per_group, M, OH, OW,
                stride_yb, stride_yn, stride_yh, stride_yw)


@triton.jit
def _store_nchw(out_ptr, values, offs_m, channels, channel_in, M, OH, OW, stride_b, stride_c, stride_h, stride_w):
    """out[b, channels, oh, ow] = values (``[BLOCK_M, BLOCK_N]``) at flat positions ``offs_m < M``;
    the pointers are formed here, after the main loop, so that they hold no registers during it."""
    b, oh, ow = _positions(offs_m, OH, OW)
    ptrs = (out_ptr + (b.to(tl.int64) * stride_b + oh * stride_h + ow * stride_w)[:, None]
            + (channels * stride_c)[None, :])
    tl.store(ptrs, values.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & channel_in[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "channels_per_group"])
@triton.jit(do_not_specialize=SIZE_ARGS)
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
    ``M = B*H*W > 0`` input positions; BLOCK_K tiles the group's channels, BLOCK_N the filters; one flat
    loop over (tap, filter chunk). Grid: ``(cdiv(M, BLOCK_M), cdiv(channels_per_group, BLOCK_K), groups)``."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    group = tl.program_id(2)
    count = tl.load(count_ptr + group)
    first = group * rows_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    # Out-of-range positions and channels wrap onto real ones; the store discards them.
    b, ih, iw = _positions(offs_m % M, H, W)
    g_batch = g_ptr + b.to(tl.int64) * stride_gb
    w_chan = w_ptr + (offs_c % channels_per_group) * stride_wc
    n_chunks = tl.cdiv(count, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    for step in range(0, KH * KW * n_chunks):
        kh, kw, p0 = _tap(step, n_chunks, KW, BLOCK_N)
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        # The output pixel this tap reaches from (ih, iw), where one exists.
        hit = (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0) & (oh < OH) & (ow < OW)
        offs_p = p0 + tl.arange(0, BLOCK_N)
        live = offs_p < count
        rows = tl.load(rows_ptr + first + offs_p, mask=live, other=0)
        a = tl.load((g_batch + oh * stride_gh + ow * stride_gw)[:, None] + (rows * stride_gn)[None, :],
                    mask=hit[:, None] & live[None, :], other=0.0)
        w = tl.load((w_chan + kh * stride_wh + kw * stride_ww)[None, :] + (rows.to(tl.int64) * stride_wn)[:, None],
                    mask=live[:, None], other=0.0)
        acc = mma(acc, a, w, PRECISION, UPCAST)
    _store_nchw(dx_ptr, acc, offs_m, group * channels_per_group + offs_c, offs_c < channels_per_group, M, H, W,
                stride_dxb, stride_dxc, stride_dxh, stride_dxw)


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "rows_per_group", "channels_per_group"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _conv2d_bwd_dw_kernel(
    g_ptr, x_ptr, gw_ptr, rows_ptr, count_ptr,
    M, H, W, OH, OW, rows_per_group, channels_per_group, fan_in, n_split, m_chunk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_gb, stride_gn, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wc, stride_wh, stride_ww, stride_gws,
    KH: tl.constexpr, KW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw[s, rows[p], (c, kh, kw)] = weight gradient of filter rows[p] over slice ``s`` of the output
    positions (``m_chunk`` of them), for a group's graded list positions ``p < count[group]``, stored
    in W's in-row element order (W's strides ``stride_wc/wh/ww``). A program's columns are one tap and a
    chunk of BLOCK_K channels. Grid: ``(cdiv(rows_per_group, BLOCK_N), KH*KW*cdiv(channels_per_group,
    BLOCK_K), groups * n_split)``."""
    pid_n = tl.program_id(0)
    group = tl.program_id(2) // n_split
    split = tl.program_id(2) % n_split
    count = tl.load(count_ptr + group)
    if pid_n * BLOCK_N >= count:
        return
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    live = offs_p < count
    rows = tl.load(rows_ptr + group * rows_per_group + offs_p, mask=live, other=0)  # unset tail: row 0
    kh, kw, c0 = _tap(tl.program_id(1), tl.cdiv(channels_per_group, BLOCK_K), KW, BLOCK_K)
    channels = c0 + tl.arange(0, BLOCK_K)
    # Out-of-range channels wrap onto real ones; the store discards them.
    x_chan = x_ptr + (group * channels_per_group + channels % channels_per_group) * stride_xc
    g_rows = g_ptr + rows * stride_gn
    m_start = split * m_chunk
    m_stop = tl.minimum(m_start + m_chunk, M)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_stop
        b, oh, ow = _positions(offs_m, OH, OW)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        inside = m_in & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        batch = b.to(tl.int64)
        a = tl.load(g_rows[:, None] + (batch * stride_gb + oh * stride_gh + ow * stride_gw)[None, :],
                    mask=m_in[None, :], other=0.0)
        xs = tl.load(x_chan[None, :] + (batch * stride_xb + ih * stride_xh + iw * stride_xw)[:, None],
                     mask=inside[:, None], other=0.0)
        acc = mma(acc, a, xs, PRECISION, UPCAST)
    in_row = channels * stride_wc + kh * stride_wh + kw * stride_ww
    gw_rows = gw_ptr + split * stride_gws + rows.to(tl.int64) * fan_in
    tl.store(gw_rows[:, None] + in_row[None, :], acc, mask=live[:, None] & (channels < channels_per_group)[None, :])


def _tf32() -> bool:
    """Whether torch lets float32 convolutions use tf32 (``torch.backends.cudnn.allow_tf32``)."""
    return torch.backends.cudnn.allow_tf32


def _geometry(x: Tensor, weight: Tensor, geometry: Sequence[int]) -> tuple[dict, int]:
    """Size and geometry arguments the kernels share, by name, and ``groups``."""
    stride, padding, dilation, groups = geo = Conv2dGeometry.of(geometry)
    out_h, out_w = geo.output_hw(x.shape[2:], weight.shape[2:])
    n_rows = weight.shape[0]
    return {
        "H": x.shape[2], "W": x.shape[3], "OH": out_h, "OW": out_w,
        "rows_per_group": n_rows // groups, "channels_per_group": x.shape[1] // groups,
        "stride_h": stride[0], "stride_w": stride[1], "pad_h": padding[0], "pad_w": padding[1],
        "dil_h": dilation[0], "dil_w": dilation[1], "KH": weight.shape[2], "KW": weight.shape[3],
    }, groups


def _strides(prefix: str, t: Tensor, dims: str) -> dict:
    """Strides of a 4-D tensor as kernel arguments ``stride_<prefix><dim>``: e.g. ``_strides("x", x,
    "bchw")`` -> ``stride_xb, stride_xc, stride_xh, stride_xw``."""
    return {f"stride_{prefix}{dim}": step for dim, step in zip(dims, t.stride())}


def conv2d_fwd(x, weight, bias, threshold, geometry):
    """x: ``[B, C, H, W]``, weight: ``[N, C/groups, kh, kw]`` -> ``(y [B, N, OH, OW] contiguous, score [N])``."""
    weight, bias, threshold = rows_dense(weight), dense_vector(bias), dense_vector(threshold)
    geo, groups = _geometry(x, weight, geometry)
    score = row_scores(weight, threshold)
    active, count, _, _ = compact(score, groups, None)
    n_rows = weight.shape[0]
    y = x.new_empty(x.shape[0], n_rows, geo["OH"], geo["OW"])
    m = x.shape[0] * geo["OH"] * geo["OW"]
    if m:  # (the kernel wraps positions modulo M)
        grid = launch_grid((m, "BLOCK_M"), (geo["rows_per_group"], "BLOCK_N"), groups)
        _conv2d_fwd_kernel[grid](
            x, weight, bias, y, active, count, m,
            **geo, **_strides("x", x, "bchw"), **_strides("w", weight, "nchw"), **_strides("y", y, "bnhw"),
            HAS_BIAS=bias is not None, **dot_options(x.dtype, _tf32()),
        )
    return y, score


def conv2d_bwd(grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params):
    """Gradients of ``conv2d_fwd`` (see ``backends.base.Kernels``); grad_y: ``[B, N, OH, OW]``."""
    weight, bias = rows_dense(weight), dense_vector(bias)
    geo, groups = _geometry(x, weight, geometry)
    active, count, graded, graded_count = compact(score, groups, ste if need_params else None)
    options = dot_options(x.dtype, _tf32())
    w_strides = _strides("w", weight, "nchw")
    empty = x.new_empty(0)
    dx = empty
    if need_dx:
        dx = torch.empty_like(x)
        m = x.shape[0] * geo["H"] * geo["W"]
        if m:
            grid = launch_grid((m, "BLOCK_M"), (geo["channels_per_group"], "BLOCK_K"), groups)
            _conv2d_bwd_dx_kernel[grid](
                grad_y, weight, dx, active, count, m,
                **geo, **_strides("g", grad_y, "bnhw"), **w_strides, **_strides("dx", dx, "bchw"), **options,
            )
    if not need_params:
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: op outputs may not alias
    n_rows, fan_in = weight.shape[0], weight[0].numel()
    m = x.shape[0] * geo["OH"] * geo["OW"]
    split = reduction_split(m, n_rows, fan_in, x.device)
    gw = torch.empty(split, n_rows, fan_in, device=x.device, dtype=score.dtype)
    taps = geo["KH"] * geo["KW"]

    def grid(meta):
        return (max(1, triton.cdiv(geo["rows_per_group"], meta["BLOCK_N"])),
                taps * triton.cdiv(geo["channels_per_group"], meta["BLOCK_K"]), groups * split)

    _conv2d_bwd_dw_kernel[grid](
        grad_y, x, gw, graded, graded_count, m, fan_in=fan_in, n_split=split, m_chunk=triton.cdiv(m, split),
        **geo, **_strides("g", grad_y, "bnhw"), **_strides("x", x, "bchw"), **w_strides,
        stride_gws=gw.stride(0), **options,
    )
    gsum = empty if bias is None else row_sums(grad_y, graded, graded_count)
    return (dx, *param_grads(weight, bias, score, gw, gsum, ste))

