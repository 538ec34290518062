// DeviceExec: how the shared launcher logic (run_* in rows.cuh, linear.cuh, conv2d.cuh) launches kernels
// on a stream. Grids are sized from host-known bounds only; no launcher reads a device value.
#pragma once

#include "gemm.cuh"
#include "rows.cuh"

namespace spafl {

struct DeviceExec {
  cudaStream_t stream;

  template <class P>
  cudaError_t gemm(const P& p) const {
    if constexpr (UsesTensorCores<typename P::Elem>::value) {
      return tiles<WmmaGemm<P>>(p, wmma_gemm_kernel<P>);
    } else {
      return tiles<SimtGemm<P>>(p, simt_gemm_kernel<P>);
    }
  }

  template <class T>
  cudaError_t row_scores(const RowScores<T>& p) const {
    return rows(p.rows, RowScores<T>::THREADS, row_scores_kernel<T>, p);
  }

  template <class A>
  cudaError_t select_rows(const SelectRows<A>& p) const {
    // One block, also for zero rows: it still writes *count = 0.
    select_rows_kernel<A><<<1, SelectRows<A>::THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  }

  template <class T>
  cudaError_t param_grads(const ParamGrads<T>& p) const {
    return rows(p.rows, ParamGrads<T>::THREADS, param_grads_kernel<T>, p);
  }

 private:
  // One block per BM x BN tile of the worst-case extents (m_bound x n_bound).
  template <class G, class P>
  cudaError_t tiles(const P& p, void (*kernel)(P)) const {
    const int64_t grid_m = ceil_div(p.m_bound(), G::BM), grid_n = ceil_div(p.n_bound(), G::BN);
    if (grid_m <= 0 || grid_n <= 0) return cudaSuccess;  // empty output
    if (grid_m > INT32_MAX || grid_n > 65535) return cudaErrorInvalidConfiguration;
    kernel<<<dim3(unsigned(grid_m), unsigned(grid_n)), G::THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  }

  // One block per row.
  template <class P>
  cudaError_t rows(int64_t n_rows, int threads, void (*kernel)(P), const P& p) const {
    if (n_rows <= 0) return cudaSuccess;
    if (n_rows > INT32_MAX) return cudaErrorInvalidConfiguration;
    kernel<<<unsigned(n_rows), threads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace spafl
