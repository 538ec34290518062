// Sparse Linear as gather-fused GEMM problems for gemm.cuh (row-major x [M, K], weight [N, K],
// grad_y / y [M, N]). The row sets come from select_rows (rows.cuh); their counts stay on the device.
// The problem structs here and in conv2d.cuh are alike on purpose (gemm.cuh says why).
#pragma once

#include "gemm.cuh"

namespace spafl {

// y[m, perm[p]] = x[m, :] . W[perm[p], :] + b[perm[p]] for active positions p < count, 0 for the rest.
// Columns are permutation positions p in [0, N): tiles past count skip the reduction and only write the
// zeros of the pruned columns, so y needs no separate fill.
template <class T>
struct LinearFwd {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  static constexpr bool kAFastK = true, kBFastK = true, kCFastM = false;  // x, W rows and y rows are contiguous
  const T* x;
  const T* weight;
  const T* bias;  // may be null
  const int64_t* perm;
  const int64_t* count;
  T* y;
  int64_t M, N, K;

  int64_t m_bound() const { return M; }
  int64_t n_bound() const { return N; }
  SPAFL_HD int64_t m_extent() const { return M; }
  SPAFL_HD int64_t n_extent() const { return N; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t n0) const { return n0 < *count ? K : 0; }
  SPAFL_HD T a(int64_t m, int64_t k) const { return x[m * K + k]; }
  SPAFL_HD T b(int64_t k, int64_t p) const { return weight[perm[p] * K + k]; }
  SPAFL_HD void store(int64_t m, int64_t p, Acc v) const {
    const int64_t n = perm[p];
    Acc out = 0;  // pruned rows output exactly 0, bias included
    if (p < *count) out = v + (bias ? to_acc(bias[n]) : Acc(0));
    y[m * N + n] = from_acc<T>(out);
  }
};

// dx[m, j] = sum_{q < count} grad_y[m, active[q]] W[active[q], j]: the reduction runs over active rows only.
template <class T>
struct LinearDx {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  static constexpr bool kAFastK = true, kBFastK = false, kCFastM = false;  // W rows and dx rows contiguous
  const T* grad_y;
  const T* weight;
  const int64_t* active;
  const int64_t* count;
  T* dx;
  int64_t M, N, K;

  int64_t m_bound() const { return M; }
  int64_t n_bound() const { return K; }
  SPAFL_HD int64_t m_extent() const { return M; }
  SPAFL_HD int64_t n_extent() const { return K; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t) const { return *count; }
  SPAFL_HD T a(int64_t m, int64_t q) const { return grad_y[m * N + active[q]]; }
  SPAFL_HD T b(int64_t q, int64_t j) const { return weight[active[q] * K + j]; }
  SPAFL_HD void store(int64_t m, int64_t j, Acc v) const { dx[m * K + j] = from_acc<T>(v); }
};

// G[rows[p], j] = sum_m grad_y[m, rows[p]] x[m, j] for the p < count rows that need a weight gradient;
// blocks past count exit (param_grads writes the other rows).
template <class T>
struct LinearDw {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  // A(p, m) = grad_y[m, rows[p]]: consecutive p are mostly neighbouring columns; x rows contiguous in j.
  static constexpr bool kAFastK = false, kBFastK = false, kCFastM = false;
  const T* grad_y;
  const T* x;
  const int64_t* rows;
  const int64_t* count;
  T* dweight;
  int64_t M, N, K;

  int64_t m_bound() const { return N; }
  int64_t n_bound() const { return K; }
  SPAFL_HD int64_t m_extent() const { return *count; }
  SPAFL_HD int64_t n_extent() const { return K; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t) const { return M; }
  SPAFL_HD T a(int64_t p, int64_t m) const { return grad_y[m * N + rows[p]]; }
  SPAFL_HD T b(int64_t m, int64_t j) const { return x[m * K + j]; }
  SPAFL_HD void store(int64_t p, int64_t j, Acc v) const { dweight[rows[p] * K + j] = from_acc<T>(v); }
};

// Shared launcher logic for the device (linear.cu) and the host emulation: Exec provides gemm(P).

template <class Exec>
cudaError_t run_linear_fwd(const Exec& exec, int dtype, const void* x, const void* weight, const void* bias,
                           const int64_t* perm, const int64_t* count, void* y, int64_t M, int64_t N, int64_t K) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return exec.gemm(LinearFwd<T>{static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                                  perm, count, static_cast<T*>(y), M, N, K});
  });
}

template <class Exec>
cudaError_t run_linear_dx(const Exec& exec, int dtype, const void* grad_y, const void* weight, const int64_t* active,
                          const int64_t* count, void* dx, int64_t M, int64_t N, int64_t K) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return exec.gemm(LinearDx<T>{static_cast<const T*>(grad_y), static_cast<const T*>(weight), active, count,
                                 static_cast<T*>(dx), M, N, K});
  });
}

template <class Exec>
cudaError_t run_linear_dw(const Exec& exec, int dtype, const void* grad_y, const void* x, const int64_t* rows,
                          const int64_t* count, void* dweight, int64_t M, int64_t N, int64_t K) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return exec.gemm(LinearDw<T>{static_cast<const T*>(grad_y), static_cast<const T*>(x), rows, count,
                                 static_cast<T*>(dweight), M, N, K});
  });
}

}  // namespace spafl
