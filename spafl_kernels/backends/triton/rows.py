"""Row bookkeeping on the device, shared by the Triton Linear and Conv2d kernels.

Three kernels, none of which hands anything back to the host:

- ``_score_fwd_kernel``: ``s_i = mean_j |W_ij| - tau_i`` for every row (docs/DESIGN.md §2).
- ``_compact_fwd_kernel``: per group of rows (a Conv2d's ``groups``; one group for Linear), the list
  of active rows in ascending order followed by the pruned rows, and the active count; for the
  backward pass also the list of *graded* rows (active, or pruned with an open STE gate) and its count.
  The counts stay on the device: the GEMM kernels' grids are sized for every row, and programs whose
  tile lies past the count exit (or, in the forward pass, zero-fill the pruned outputs).
- ``_param_grads_bwd_kernel``: from the weight gradient ``G`` of the graded rows, for a block of rows,
  computes ``dL/dm_i = <G_i, W_i> + b_i * sum(g_i)`` and writes ``dL/dW_i``, ``dL/db_i``, ``dL/dtau_i``.
  The STE term of ``dL/dW_i`` needs ``dL/dm_i`` of the *whole* row, which no tile of the dW GEMM sees,
  so the GEMM writes ``G`` (float32, possibly split over the reduction) and this kernel makes the single
  pass over each row that turns it into ``dL/dW``.

Host helpers choose tile configurations: on CUDA a small autotuned set, under ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, used by CI) one small fixed configuration so that the tests stay fast.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ...semantics import acc_dtype, score_lanes

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether ``triton.jit`` built interpreter functions: it decides when the kernels are defined (at
import), so this is read once here and never again."""

AUTOTUNE = os.environ.get("SPAFL_TRITON_AUTOTUNE", "1") != "0"
"""``SPAFL_TRITON_AUTOTUNE=0`` (read at import): one fixed tile per GEMM kernel instead of autotuning,
so that correctness tests over many shapes and dtypes do not compile and time every tile for each."""

CUDA_GEMM_TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    # Eight warps keep the gathered-pointer tiles in registers: four-warp versions of these tiles
    # spill in most kernels; with eight, 64x64x32 spills in none and the larger ones in some
    # (benchmarks/results/triton-compile.md), which autotuning weighs against their reuse. Few
    # configurations: each one is compiled per kernel and layer shape before autotuning can time it.
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 8, 3),
    (64, 64, 64, 8, 3),
]

SIZE_ARGS = ["M", "N", "H", "W", "OH", "OW", "rows_per_group", "pad_h", "pad_w", "dil_h", "dil_w", "m_chunk", "n_split"]
"""Integer arguments the GEMM kernels are not specialised on (``triton.jit(do_not_specialize=...)``):
sizes that differ from layer to layer but never decide a load's alignment, so that a new layer shape
does not mean a new compilation. Strides, K and channel counts keep their specialisation (a stride of
1 or a multiple of 16 lets loads vectorise)."""


def gemm_configs() -> list[triton.Config]:
    """Autotune configurations of the GEMM kernels: ``CUDA_GEMM_TILES`` on a GPU (only the spill-free
    64x64x32 one without ``AUTOTUNE``); under the interpreter one 32x32x32 tile: there is nothing to tune,
    and its cost is per operation rather than per element, so fewer, larger programs run the tests
    faster while small shapes still span several tiles."""
    if INTERPRET:
        tiles = [(32, 32, 32, 1, 1)]
    else:
        tiles = CUDA_GEMM_TILES if AUTOTUNE else [(64, 64, 32, 8, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


def dot_options(dtype: torch.dtype, tf32: bool) -> dict:
    """Compile-time constants the GEMM kernels take for operands of ``dtype``.

    ``PRECISION``: ``tl.dot``'s input precision, ``"tf32"`` only for float32 where torch allows tf32 for
    the matching dense op (``tf32``); ``UPCAST``: convert bfloat16 tiles to float32 before ``tl.dot``,
    only under the interpreter, whose bfloat16 ``tl.dot`` returns garbage (triton 3.9; GPUs multiply
    bfloat16 natively); ``ACC64``: accumulate in float64 (float64 inputs).
    """
    return {
        "PRECISION": "tf32" if (tf32 and dtype == torch.float32 and not INTERPRET) else "ieee",
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "ACC64": acc_dtype(dtype) == torch.float64,
    }


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device about four times over (a device property: no synchronisation)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: small, so that CI's small shapes still exercise split reductions


def reduction_split(positions: int, n_rows: int, fan_in: int, device: torch.device) -> int:
    """Slices the dW GEMM splits its reduction over ``positions`` (batch, times space for Conv2d) into.

    Its output, ``n_rows x fan_in``, is small for convolutions while the reduction is long, so
    without a split a few programs would do all the work. Chosen from shapes alone (64x64 tiles
    assumed, at least ``min_chunk`` positions per slice), never from the active count.
    """
    min_chunk = 64 if INTERPRET else 256
    tiles = triton.cdiv(n_rows, 64) * triton.cdiv(fan_in, 64)
    wanted = triton.cdiv(_target_programs(device), tiles)
    return max(1, min(wanted, triton.cdiv(positions, min_chunk)))


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def gate_open(s, STE: tl.constexpr):
    """Whether the STE gate of score(s) ``s`` is open; ``STE``: a code of ``semantics.STE_CODES``."""
    # Negated comparisons: a NaN score has its gate open (semantics.is_active).
    if STE == 1:
        is_open = ~(tl.abs(s) <= 1.0)
    elif STE == 2:
        is_open = ~(tl.abs(s) > 1.0)
    else:
        is_open = (s == s) | (s != s)  # everywhere, NaN included, as the reference's ones_like
    return is_open


@triton.jit
def mma(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on tensor cores where the dtype allows; see ``dot_options``."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _score_fwd_kernel(
    w_ptr, tau_ptr, score_ptr, n_rows, fan_in, stride_wn,
    BLOCK_R: tl.constexpr, LANES: tl.constexpr, FOLDS: tl.constexpr,
):
    """score[n_rows] (float32, or float64 for float64 weights) from W rows of ``fan_in`` contiguous
    elements, ``stride_wn`` apart, and tau[n_rows], summed in ``semantics.row_score``'s order (``LANES``:
    ``score_lanes``; ``FOLDS``: its log2). Grid: ``cdiv(n_rows, BLOCK_R)``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    row_start = w_ptr + rows.to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_R, LANES], dtype=score_ptr.dtype.element_ty)
    for k0 in range(0, fan_in, LANES):  # lane l adds column k0 + l: the lanes' sequential sums
        cols = k0 + tl.arange(0, LANES)
        w = tl.load(row_start[:, None] + cols[None, :], mask=live[:, None] & (cols < fan_in)[None, :], other=0.0)
        acc += tl.abs(w.to(acc.dtype))
    for fold in tl.static_range(FOLDS):  # fold by halves: lane[l] += lane[l + w/2]
        acc = tl.sum(tl.reshape(acc, [BLOCK_R, 2, LANES >> (fold + 1)]), 1)  # a sum of two: one add per lane
    l1 = tl.reshape(acc, [BLOCK_R])
    tau = tl.load(tau_ptr + rows, mask=live, other=0.0).to(l1.dtype)
    n = (tl.maximum(tl.full([BLOCK_R], 0, tl.int32) + fan_in, 1)).to(l1.dtype)
    if l1.dtype == tl.float64:  # float64 ``/`` is IEEE division
        mean = l1 / n
    else:  # Triton's float32 ``/`` is an approximate division on the GPU: ask for the IEEE one
        mean = tl.math.div_rn(l1, n)
    tl.store(score_ptr + rows, mean - tau, mask=live)


@triton.jit
def _compact_fwd_kernel(
    score_ptr, active_ptr, active_count_ptr, graded_ptr, graded_count_ptr, rows_per_group,
    STE: tl.constexpr, GRADED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per group ``g`` (grid: groups), over rows ``[g*R, (g+1)*R)`` with ``R = rows_per_group``:

    - active[g*R : g*R + count]: active rows, ascending; active[g*R + count : (g+1)*R]: the pruned rows;
      active_count[g] = count (int32).
    - with ``GRADED``: graded[g*R : g*R + graded_count[g]]: rows that are active or have an open gate.
    Stable order keeps the output writes of neighbouring rows together.
    """
    group = tl.program_id(0)
    first = group * rows_per_group
    n_active = tl.zeros((), dtype=tl.int32)
    n_pruned = tl.zeros((), dtype=tl.int32)
    n_graded = tl.zeros((), dtype=tl.int32)
    for b0 in range(0, rows_per_group, BLOCK):
        i = b0 + tl.arange(0, BLOCK)
        inside = i < rows_per_group
        s = tl.load(score_ptr + first + i, mask=inside, other=0.0)
        active = ~(s <= 0) & inside  # NaN counts as active (semantics.is_active)
        pruned = (s <= 0) & inside
        # Prefix sums give each row its slot; pruned rows fill the group's tail from the end.
        slot = n_active + tl.cumsum(active.to(tl.int32), 0) - 1
        tl.store(active_ptr + first + slot, first + i, mask=active)
        tail = n_pruned + tl.cumsum(pruned.to(tl.int32), 0)
        tl.store(active_ptr + first + rows_per_group - tail, first + i, mask=pruned)
        n_active += tl.sum(active.to(tl.int32), 0)
        n_pruned += tl.sum(pruned.to(tl.int32), 0)
        if GRADED:
            graded = (active | gate_open(s, STE)) & inside
            slot = n_graded + tl.cumsum(graded.to(tl.int32), 0) - 1
            tl.store(graded_ptr + first + slot, first + i, mask=graded)
            n_graded += tl.sum(graded.to(tl.int32), 0)
    tl.store(active_count_ptr + group, n_active)
    if GRADED:
        tl.store(graded_count_ptr + group, n_graded)


@triton.jit
def _row_sums_bwd_kernel(
    g_ptr, gsum_ptr, rows_ptr, count_ptr,
    n_rows, rows_per_group, OH, OW, positions, chunk,
    stride_gb, stride_gn, stride_gh, stride_gw,
    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """gsum[s, rows[p]] = sum of g[b, rows[p], oh, ow] over slice ``s`` (``chunk`` of the ``positions =
    B*OH*OW`` flat positions) for a group's list positions ``p < count[group]``. g: ``[B, N, OH, OW]``,
    any strides (a Linear's ``[M, N]`` as ``[M, N, 1, 1]``). Grid: ``(cdiv(rows_per_group, BLOCK_R),
    groups, slices)``. dL/db needs these sums for the active rows and dL/dm for the graded ones; a
    separate pass keeps the reduction out of the GEMMs' register budget, as cuBLAS/cuDNN users do."""
    group = tl.program_id(1)
    split = tl.program_id(2)
    count = tl.load(count_ptr + group)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(0) * BLOCK_R >= count:
        return
    live = offs_r < count
    rows = tl.load(rows_ptr + group * rows_per_group + offs_r, mask=live, other=0)
    start = split * chunk
    stop = tl.minimum(start + chunk, positions)
    acc = tl.zeros([BLOCK_Q, BLOCK_R], dtype=gsum_ptr.dtype.element_ty)
    for q0 in range(start, stop, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        ow = q % OW
        rest = q // OW
        offs = (rest // OH).to(tl.int64) * stride_gb + (rest % OH) * stride_gh + ow * stride_gw
        g = tl.load(g_ptr + offs[:, None] + rows[None, :] * stride_gn, mask=(q < stop)[:, None] & live[None, :],
                    other=0.0)
        acc += g.to(acc.dtype)
    tl.store(gsum_ptr + split * n_rows + rows, tl.sum(acc, 0), mask=live)


@triton.jit
def _summed_g(g_rows, cols, mask, n_split, stride_gs, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """``[BLOCK_R, BLOCK]`` chunk of ``G = sum_s gw[s]`` at row starts ``g_rows`` and columns ``cols``;
    0 where ``mask`` is false (masked loads touch no memory)."""
    g = tl.zeros([BLOCK_R, BLOCK], dtype=g_rows.dtype.element_ty)
    for split in range(0, n_split):
        g += tl.load(g_rows[:, None] + split * stride_gs + cols[None, :], mask=mask, other=0.0)
    return g


@triton.jit
def _store_dw(dw_rows, cols, mask, g, w, coeff):
    """dW chunk = G (zeroed beforehand where the row is pruned) + coeff * sign(W)."""
    sign = (w > 0).to(g.dtype) - (w < 0).to(g.dtype)
    tl.store(dw_rows[:, None] + cols[None, :], (g + coeff[:, None] * sign).to(dw_rows.dtype.element_ty), mask=mask)


@triton.jit
def _param_grads_bwd_kernel(
    w_ptr, gw_ptr, gsum_ptr, b_ptr, score_ptr, dw_ptr, db_ptr, dtau_ptr,
    n_rows, fan_in, n_split, n_sum_split, stride_gs, stride_wn, stride_dwn,
    STE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """For rows i (``BLOCK_R`` per program; grid: ``cdiv(n_rows, BLOCK_R)``):

    dW[i] = m_i * G_i + gate_i * dm_i * sign(W_i) / fan_in,  db[i] = m_i * gsum_i,  dtau[i] = -gate_i * dm_i

    with ``dm_i = <G_i, W_i> + b_i * gsum_i``, ``G_i = sum_s gw[s, i, :]``, ``gsum_i = sum_s gsum[s, i]``
    (``n_sum_split`` slices).
    gw: ``[n_split, n_rows, fan_in]`` (split stride ``stride_gs``), filled for graded rows only, in W's
    in-row element order. Rows of W and dW are ``fan_in`` contiguous elements, ``stride_wn`` /
    ``stride_dwn`` apart. ``ONE_CHUNK`` (``fan_in <= BLOCK``): a row stays in registers between dm and
    dW; otherwise dm takes a first pass over the row and dW a second.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    s = tl.load(score_ptr + rows, mask=live, other=0.0)
    active = ~(s <= 0) & live
    gate = gate_open(s, STE) & live
    acc_dtype = score_ptr.dtype.element_ty
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    g_rows = gw_ptr + rows.to(tl.int64) * fan_in
    dw_rows = dw_ptr + rows.to(tl.int64) * stride_dwn
    gsum = tl.zeros([BLOCK_R], dtype=acc_dtype)
    if HAS_BIAS:
        for split in range(0, n_sum_split):
            gsum += tl.load(gsum_ptr + split * n_rows + rows, mask=active | gate, other=0.0)
    # dm is needed where the gate is open; G where the row is active (dense part) or dm is needed.
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK)
        inside = cols < fan_in
        g = _summed_g(g_rows, cols, (active | gate)[:, None] & inside[None, :], n_split, stride_gs, BLOCK_R, BLOCK)
        w = tl.load(w_rows[:, None] + cols[None, :], mask=gate[:, None] & inside[None, :], other=0.0).to(acc_dtype)
        dm = tl.sum(g * w, 1)
    else:
        partial = tl.zeros([BLOCK_R, BLOCK], dtype=acc_dtype)
        for k0 in range(0, fan_in, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            mask = gate[:, None] & (cols < fan_in)[None, :]
            g = _summed_g(g_rows, cols, mask, n_split, stride_gs, BLOCK_R, BLOCK)
            partial += g * tl.load(w_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
        dm = tl.sum(partial, 1)
    if HAS_BIAS:
        dm += tl.load(b_ptr + rows, mask=gate, other=0.0).to(acc_dtype) * gsum
    dm = tl.where(gate, dm, 0.0)
    coeff = dm / fan_in
    if ONE_CHUNK:
        _store_dw(dw_rows, cols, live[:, None] & inside[None, :], tl.where(active[:, None], g, 0.0), w, coeff)
    else:
        for k0 in range(0, fan_in, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            inside = cols < fan_in
            g = _summed_g(g_rows, cols, active[:, None] & inside[None, :], n_split, stride_gs, BLOCK_R, BLOCK)
            w = tl.load(w_rows[:, None] + cols[None, :], mask=gate[:, None] & inside[None, :], other=0.0)
            _store_dw(dw_rows, cols, live[:, None] & inside[None, :], g, w.to(acc_dtype), coeff)
    if HAS_BIAS:
        tl.store(db_ptr + rows, tl.where(active, gsum, 0.0).to(db_ptr.dtype.element_ty), mask=live)
    tl.store(dtau_ptr + rows, (-dm).to(dtau_ptr.dtype.element_ty), mask=live)


# ---------------------------------------------------------------------------------------- launchers


def rows_dense(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` itself when every row is one contiguous block of ``fan_in`` elements (row-major, or
    channels_last for a Conv2d weight), else a contiguous copy. The kernels address rows as such blocks."""
    if weight.dim() == 2:
        return weight if weight.stride(1) == 1 else weight.contiguous()
    if weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    return weight.contiguous()


def dense_vector(vector: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or threshold ``[N]`` with unit stride (the kernels index it as ``ptr + row``): ``vector``
    itself when it has one, else a contiguous copy (sliced, expanded with stride 0, ...)."""
    return vector if vector is None or vector.stride(0) == 1 else vector.contiguous()


def row_scores(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Scores ``[N]`` in ``acc_dtype(weight.dtype)``; weight: ``[N, ...]`` as ``rows_dense`` returns."""
    if not weight.is_contiguous():  # a channels_last filter: sum in row-major order, as row_score defines
        weight = weight.contiguous()
    n_rows = weight.shape[0]
    fan_in = weight.numel() // max(n_rows, 1)
    score = torch.empty(n_rows, device=weight.device, dtype=acc_dtype(weight.dtype))
    block_r = 16 if INTERPRET else 4
    lanes = score_lanes(score.dtype)
    if n_rows:
        grid = (triton.cdiv(n_rows, block_r),)
        _score_fwd_kernel[grid](
            weight, threshold, score, n_rows, fan_in, weight.stride(0), BLOCK_R=block_r,
            LANES=lanes, FOLDS=lanes.bit_length() - 1,
        )
    return score


def compact(score: torch.Tensor, groups: int, ste: int | None):
    """Row lists on the device: ``(active [N] int32, active_count [groups] int32)``, plus
    ``(graded [N] int32, graded_count [groups] int32)`` when ``ste`` is given (else ``None, None``).
    See ``_compact_fwd_kernel`` for the layout."""
    n_rows = score.shape[0]
    int32 = {"device": score.device, "dtype": torch.int32}
    active, active_count = torch.empty(n_rows, **int32), torch.empty(groups, **int32)
    graded = graded_count = None
    if ste is not None:
        graded, graded_count = torch.empty(n_rows, **int32), torch.empty(groups, **int32)
    _compact_fwd_kernel[(groups,)](
        score, active, active_count,
        active if graded is None else graded, active_count if graded_count is None else graded_count,
        n_rows // groups,
        STE=0 if ste is None else ste, GRADED=ste is not None, BLOCK=64 if INTERPRET else 1024,
    )
    return active, active_count, graded, graded_count


def row_sums(grad: torch.Tensor, rows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[split, N]`` partial sums of grad ``[B, N, OH, OW]`` over batch and space, for the rows listed
    (per group: ``rows``/``count`` as ``compact`` returns them); the other rows' entries are unset."""
    batch, n_rows, out_h, out_w = grad.shape
    groups = count.shape[0]
    positions = batch * out_h * out_w
    block_r = 16 if INTERPRET else 64
    split = reduction_split(positions, n_rows, 1, grad.device)
    gsum = torch.empty(split, n_rows, device=grad.device, dtype=acc_dtype(grad.dtype))
    grid = (max(1, triton.cdiv(n_rows // groups, block_r)), groups, split)
    _row_sums_bwd_kernel[grid](
        grad, gsum, rows, count, n_rows, n_rows // groups, out_h, out_w, positions, triton.cdiv(positions, split),
        *grad.stride(), BLOCK_Q=16 if INTERPRET else 64, BLOCK_R=block_r,
    )
    return gsum


def param_grads(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    score: torch.Tensor,
    gw: torch.Tensor,
    gsum: torch.Tensor,
    ste: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dweight like weight, dbias [N] or empty, dthreshold [N])`` from the dW GEMM's partial
    results: gw ``[split, N, fan_in]`` and, with a bias, gsum ``[sum_split, N]`` (accumulation dtype)."""
    n_rows = weight.shape[0]
    fan_in = weight.numel() // max(n_rows, 1)
    dweight = torch.empty_like(weight)
    dthreshold = torch.empty(n_rows, device=weight.device, dtype=weight.dtype)
    dbias = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    # Whole rows in registers up to 8192 elements (one pass over G and W), at least 2048 elements
    # per program; the interpreter takes small chunks so that tests cover both paths.
    block = min(triton.next_power_of_2(max(fan_in, 1)), 64 if INTERPRET else 8192)
    block_r = 16 if INTERPRET else max(1, 2048 // block)
    if n_rows:
        _param_grads_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
            weight, gw, gsum, bias, score, dweight, dbias, dthreshold,
            n_rows, fan_in, gw.shape[0], gsum.shape[0], gw.stride(0), weight.stride(0), dweight.stride(0),
            STE=ste, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK=block,
            ONE_CHUNK=fan_in <= block, num_warps=8 if block * block_r > 2048 else 4,
        )
    return dweight, dbias, dthreshold


def launch_grid(*dims):
    """A launch grid from ``(size, block name)`` pairs and plain ints, at least one program per axis
    (empty tensors launch one idle program instead of an invalid empty grid)."""
    return lambda meta: tuple(
        d if isinstance(d, int) else max(1, triton.cdiv(d[0], meta[d[1]])) for d in dims
    )

