"""Triton sparse Linear: indexed GEMMs over the active (forward, dX) or graded (dW) rows.

Shapes: x ``[M, K]``, weight ``[N, K]``, y ``[M, N]``. The row lists and their counts come from
``rows.compact`` and stay on the device; every grid covers all ``N`` rows and the programs past the
count exit (the forward pass's zero-fill their pruned output columns instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, rows_ptr, count_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[:, rows[p]] = x @ W[rows[p]].T + b[rows[p]] for list positions ``p < count``, and 0 for the
    pruned rows listed after them. Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``, ``M, K > 0``; axis 0
    runs fastest, so the programs sharing a tile of W run together and read it once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.load(count_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + offs_p, mask=offs_p < N, other=0)
    if pid_n * BLOCK_N >= count:  # a tile of pruned rows only: zeros, no GEMM
        _store_y(y_ptr, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), offs_m, offs_p, rows, M, N,
                 stride_ym, stride_yn)
        return
    # Out-of-range batch rows wrap onto real ones and pruned rows at the tile's end are computed like
    # the others: the loads need only the K mask, and the epilogue discards those lanes.
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + rows.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        acc = mma(acc, a, b, PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(acc.dtype)[None, :]
    acc = tl.where((offs_p < count)[None, :], acc, 0.0)  # pruned: exactly 0, whatever their weights hold
    _store_y(y_ptr, acc, offs_m, offs_p, rows, M, N, stride_ym, stride_yn)


@triton.jit
def _store_y(y_ptr, values, offs_m, offs_p, rows, M, N, stride_ym, stride_yn):
    """y[offs_m, rows] = values (``[BLOCK_M, BLOCK_N]``) where ``offs_m < M`` and ``offs_p < N``; the
    pointers are formed here, after the K loop, so that they hold no registers during it."""
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :] * stride_yn
    tl.store(y_ptrs, values.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_p < N)[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _linear_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, rows_ptr, count_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_wn, stride_dxm, stride_dxk,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = g[:, rows[:count]] @ W[rows[:count]]: the reduction runs over the active rows only.
    Grid: ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))``, ``M, K > 0``; BLOCK_N is the reduction step."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    count = tl.load(count_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Out-of-range lanes wrap onto real rows and columns; the store discards them.
    g_rows = g_ptr + (offs_m % M).to(tl.int64) * stride_gm
    w_cols = w_ptr + offs_k % K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    for p0 in range(0, count, BLOCK_N):
        offs_p = p0 + tl.arange(0, BLOCK_N)
        live = offs_p < count
        rows = tl.load(rows_ptr + offs_p, mask=live, other=0)
        a = tl.load(g_rows[:, None] + rows[None, :] * stride_gn, mask=live[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + rows.to(tl.int64)[:, None] * stride_wn, mask=live[:, None], other=0.0)
        acc = mma(acc, a, b, PRECISION, UPCAST)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _linear_bwd_dw_kernel(
    g_ptr, x_ptr, gw_ptr, rows_ptr, count_ptr,
    M, N, K, m_chunk,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_gws,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw[s, rows[p], :] = g[M_s, rows[p]].T @ x[M_s, :] for graded positions ``p < count``, where
    ``M_s`` is slice ``s`` of the batch (``m_chunk`` rows). Grid: ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K),
    slices)``, ``K > 0``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N >= count:
        return
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    live = offs_p < count
    rows = tl.load(rows_ptr + offs_p, mask=live, other=0)  # the list's tail is unset: row 0 stands in
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_start = split * m_chunk
    m_stop = tl.minimum(m_start + m_chunk, M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    g_ptrs = g_ptr + rows[:, None] * stride_gn + offs_m.to(tl.int64)[None, :] * stride_gm
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (offs_k % K)[None, :] * stride_xk
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64 if ACC64 else tl.float32)
    for m0 in range(m_start, m_stop, BLOCK_M):
        m_in = offs_m < m_stop - (m0 - m_start)
        a = tl.load(g_ptrs, mask=m_in[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
        acc = mma(acc, a, b, PRECISION, UPCAST)
        g_ptrs += BLOCK_M * stride_gm
        x_ptrs += BLOCK_M * stride_xm
    gw_rows = gw_ptr + split * stride_gws + rows.to(tl.int64) * K
    tl.store(gw_rows[:, None] + offs_k[None, :], acc, mask=live[:, None] & (offs_k < K)[None, :])


def _tf32() -> bool:
    """Whether torch lets float32 matmuls use tf32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    return torch.backends.cuda.matmul.allow_tf32


def linear_fwd(x, weight, bias, threshold):
    """x: ``[M, K]``, weight: ``[N, K]``, bias/threshold: ``[N]`` -> ``(y [M, N], score [N])``."""
    weight, bias, threshold = rows_dense(weight), dense_vector(bias), dense_vector(threshold)
    (m, k), n = x.shape, weight.shape[0]
    score = row_scores(weight, threshold)
    active, count, _, _ = compact(score, 1, None)
    y = x.new_empty(m, n)
    if m:  # (the kernel wraps batch indices modulo M)
        _linear_fwd_kernel[launch_grid((m, "BLOCK_M"), (n, "BLOCK_N"))](
            x, weight, bias, y, active, count, m, n, k,
            x.stride(0), x.stride(1), weight.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, **dot_options(x.dtype, _tf32()),
        )
    return y, score


def linear_bwd(grad_y, x, weight, bias, score, ste, need_dx, need_params):
    """Gradients of ``linear_fwd`` (see ``backends.base.Kernels``); grad_y: ``[M, N]``."""
    weight, bias = rows_dense(weight), dense_vector(bias)
    (m, k), n = x.shape, weight.shape[0]
    active, count, graded, graded_count = compact(score, 1, ste if need_params else None)
    options = dot_options(x.dtype, _tf32())
    empty = x.new_empty(0)
    dx = empty
    if need_dx:
        dx = torch.empty_like(x)
        if dx.numel():
            _linear_bwd_dx_kernel[launch_grid((m, "BLOCK_M"), (k, "BLOCK_K"))](
                grad_y, weight, dx, active, count, m, n, k,
                grad_y.stride(0), grad_y.stride(1), weight.stride(0), dx.stride(0), dx.stride(1),
                **options,
            )
    if not need_params:
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: op outputs may not alias
    split = reduction_split(m, n, k, x.device)
    gw = torch.empty(split, n, k, device=x.device, dtype=score.dtype)
    if k:
        _linear_bwd_dw_kernel[launch_grid((n, "BLOCK_N"), (k, "BLOCK_K"), split)](
            grad_y, x, gw, graded, graded_count, m, n, k, triton.cdiv(m, split),
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), gw.stride(0), **options,
        )
    gsum = empty
    if bias is not None:
        gsum = row_sums(grad_y[:, :, None, None], graded, graded_count)
    return (dx, *param_grads(weight, bias, score, gw, gsum, ste))

