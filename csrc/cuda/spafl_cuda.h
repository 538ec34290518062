// C interface of the CUDA kernels (docs/DESIGN.md §4): plain pointers, sizes and a stream, no torch types,
// so that the .cu files compile with nvcc alone and the torch bindings (bindings.cpp) stay thin.
//
// Conventions shared by every launcher:
// - Tensors are dense, contiguous, row-major (NCHW for images) and on the stream's device.
// - `dtype` is a SpaflDtype code; `score` and every other "accumulation" buffer is float32 for
//   float32/float16/bfloat16 data and float64 for float64 data (semantics.acc_dtype).
// - Row sets are int64 index arrays of length `rows` plus a device-side int64 `count`: the selected rows
//   come first, in ascending order. No launcher reads `count` on the host; grids are sized for the worst
//   case and blocks past `count` exit, so nothing synchronises and the ops can be captured in CUDA graphs.
// - Launchers return the launch status (cudaGetLastError()); they never synchronise.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../spafl_ste.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum SpaflDtype { SPAFL_FLOAT32 = 0, SPAFL_FLOAT64 = 1, SPAFL_FLOAT16 = 2, SPAFL_BFLOAT16 = 3 } SpaflDtype;

// Row selection takes a SpaflSte code (../spafl_ste.h), or SPAFL_SELECT_ACTIVE: active rows only (no gate).
enum { SPAFL_SELECT_ACTIVE = -1 };

// Geometry of a Conv2d with groups == 1: x [batch, in_channels, height, width],
// weight [out_channels, in_channels, kernel_h, kernel_w], y [batch, out_channels, out_h, out_w].
typedef struct SpaflConvShape {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
} SpaflConvShape;

// score[i] = mean_j |weight[i, j]| - threshold[i]. weight [rows, fan_in], threshold [rows] (dtype);
// score [rows] (accumulation dtype).
cudaError_t spafl_cuda_row_scores(int dtype, const void* weight, const void* threshold, void* score, int64_t rows,
                                  int64_t fan_in, cudaStream_t stream);

// Row selection by score: rows with score > 0 when ste == SPAFL_SELECT_ACTIVE, else rows with
// score > 0 or an open STE gate (the rows that need a weight gradient). Writes the selected rows
// ascending to index[0:count] and *count; index[count:rows] gets the other rows ascending when
// `complement` is non-zero, else -1. One thread block; rows < 2^31.
cudaError_t spafl_cuda_select_rows(int dtype, const void* score, int64_t rows, int ste, int complement, int64_t* index,
                                   int64_t* count, cudaStream_t stream);

// Sparse Linear forward. x [M, K], weight [N, K], bias [N] or NULL, perm: the active rows then the
// pruned ones (select_rows with complement), count: number of active rows. y [M, N]: active columns
// x @ W_i + b_i, pruned columns exactly 0 (every element of y is written).
cudaError_t spafl_cuda_linear_fwd(int dtype, const void* x, const void* weight, const void* bias, const int64_t* perm,
                                  const int64_t* count, void* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// dx [M, K] = grad_y[:, active] @ weight[active, :]; grad_y [M, N]. Every element of dx is written.
cudaError_t spafl_cuda_linear_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active,
                                 const int64_t* count, void* dx, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// Dense weight gradient of the selected rows: dweight[r, :] = grad_y[:, r]^T @ x for r in
// rows[0:count]; the other rows of dweight [N, K] are left untouched (param_grads writes them).
cudaError_t spafl_cuda_linear_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows,
                                 const int64_t* count, void* dweight, int64_t M, int64_t N, int64_t K,
                                 cudaStream_t stream);

// Sparse Conv2d forward (implicit GEMM), as spafl_cuda_linear_fwd: every element of y is written.
cudaError_t spafl_cuda_conv2d_fwd(int dtype, const void* x, const void* weight, const void* bias, const int64_t* perm,
                                  const int64_t* count, void* y, const SpaflConvShape* shape, cudaStream_t stream);

// dx [batch, in_channels, height, width] over the active filters. Every element of dx is written.
cudaError_t spafl_cuda_conv2d_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active,
                                 const int64_t* count, void* dx, const SpaflConvShape* shape, cudaStream_t stream);

// Dense weight gradient of the selected filters (rows[0:count]); other filters untouched.
cudaError_t spafl_cuda_conv2d_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows,
                                 const int64_t* count, void* dweight, const SpaflConvShape* shape, cudaStream_t stream);

// Parameter gradients from the dense weight gradient G of the rows that need one (docs/DESIGN.md §2), in place:
//   on entry dweight[i, :] = G_i for every row with score > 0 or an open gate (other rows: anything);
//   dL/dm_i = <G_i, W_i> + b_i * gsum_i,  gsum_i = sum_{o < outer, s < inner} grad_y[(o * rows + i) * inner + s]
//   dweight_i = m_i G_i + gate_i dL/dm_i sign(W_i) / fan_in;  dbias_i = m_i gsum_i;  dthreshold_i = -gate_i dL/dm_i
// weight/dweight [rows, fan_in]; bias/dbias [rows] or NULL; dthreshold [rows] (dtype); score (accumulation
// dtype). Linear: outer = M, inner = 1. Conv2d: outer = batch, inner = out_h * out_w.
cudaError_t spafl_cuda_param_grads(int dtype, const void* score, int ste, const void* weight, const void* bias,
                                   const void* grad_y, void* dweight, void* dbias, void* dthreshold, int64_t rows,
                                   int64_t fan_in, int64_t outer, int64_t inner, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
