// The tiled GEMM engine behind every sparse Linear / Conv2d kernel: C[m, n] = sum_k A(m, k) B(k, n), where
// a "problem" (linear.cuh, conv2d.cuh) says how to fetch A and B elements (gathering active rows,
// im2col on the fly) and where each result goes (scattering into the full output). Two engines:
// - SIMT (float32, float64): exact FMA arithmetic in the element type, as PyTorch's default matmul
//   (no TF32), so float32 results meet the oracle's tolerance;
// - WMMA (float16, bfloat16): tensor cores, 16x16x16 fragments, fp32 accumulation (sm_80+).
//
// Problem concept P (all index arguments int64):
//   using Elem, Acc;                      element and accumulation types
//   kAFastK, kBFastK, kCFastM             which index consecutive threads walk when loading A, B and
//                                         storing C, chosen so that a warp's global accesses coalesce
//   m_bound(), n_bound()                  host: upper bounds of the extents, for the grid
//   m_extent(), n_extent()                device: actual extents (may read a device-side row count)
//   k_extent(m0, n0)                      device: reduction length of the tile at (m0, n0); 0 skips it
//   a(m, k), b(k, n)                      elements, called only for in-range indices
//   store(m, n, acc)                      called once for every in-range (m, n) of every live tile
//
// The problems (LinearFwd/Dx/Dw, Conv2dFwd/Dx/Dw) look alike on purpose, as CUTLASS's do: each spells its
// own fields and accessors, so that the addressing of each GEMM view reads in one place and inlines into
// the mainloop; a shared base or macro would save lines but hide what differs (gathers, im2col, strides).
//
// The per-thread phases (load, compute, store) are SPAFL_HD functions of an explicit thread index, so
// that tests/cuda_emulation.cpp runs them on the host, thread by thread and phase by phase, exactly
// as the kernels below order them between their __syncthreads().
#pragma once

#include "common.cuh"

#ifdef __CUDACC__
#include <mma.h>
#endif

namespace spafl {

struct Extents {
  int64_t m, n, k;
};

// Extents seen by the block whose tile starts at (m0, n0); false when the tile lies outside them (the
// block has nothing to do: worst-case grids leave such blocks when rows are pruned).
template <class P>
SPAFL_HD bool block_extents(const P& p, int64_t m0, int64_t n0, Extents& ext) {
  ext.m = p.m_extent();
  ext.n = p.n_extent();
  if (m0 >= ext.m || n0 >= ext.n) return false;
  ext.k = p.k_extent(m0, n0);
  return true;
}

// dst[mm * stride_m + kk * stride_k] = A(m0 + mm, k0 + kk) for the BM x BK tile, zero outside the extents.
template <class P, int BM, int BK, int THREADS>
SPAFL_HD void load_tile_a(const P& p, typename P::Elem* dst, int stride_m, int stride_k, int tid, int64_t m0,
                          int64_t k0, const Extents& ext) {
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int mm = P::kAFastK ? e / BK : e % BM;
    const int kk = P::kAFastK ? e % BK : e / BM;
    const int64_t m = m0 + mm, k = k0 + kk;
    dst[mm * stride_m + kk * stride_k] = (m < ext.m && k < ext.k) ? p.a(m, k) : zero<typename P::Elem>();
  }
}

// dst[kk * stride_k + nn * stride_n] = B(k0 + kk, n0 + nn) for the BK x BN tile, zero outside the extents.
template <class P, int BK, int BN, int THREADS>
SPAFL_HD void load_tile_b(const P& p, typename P::Elem* dst, int stride_k, int stride_n, int tid, int64_t k0,
                          int64_t n0, const Extents& ext) {
  for (int e = tid; e < BK * BN; e += THREADS) {
    const int kk = P::kBFastK ? e % BK : e / BN;
    const int nn = P::kBFastK ? e / BK : e % BN;
    const int64_t k = k0 + kk, n = n0 + nn;
    dst[kk * stride_k + nn * stride_n] = (k < ext.k && n < ext.n) ? p.b(k, n) : zero<typename P::Elem>();
  }
}

// ------------------------------------------------------------------------------------------- SIMT

// 256 threads as 16 x 16; each computes 4 x 4 results strided by 16 (rows r + 16 i, columns c + 16 j),
// so that the 16 threads of a half-warp touch 16 consecutive rows or columns of C.
template <class P>
struct SimtGemm {
  using T = typename P::Elem;
  using Acc = typename P::Acc;
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, TM = 4, TN = 4;
  static_assert(BM == 16 * TM && BN == 16 * TN && THREADS == 256, "16 x 16 threads cover the tile");

  struct Smem {
    // k-major, so that the inner product reads a contiguous run of each per k; the extra column spreads
    // a k-fast fill over the banks.
    T a[BK][BM + 1];
    T b[BK][BN + 1];
  };
  struct Frag {
    Acc v[TM][TN];
  };

  static SPAFL_HD int row0(int tid) { return P::kCFastM ? tid % 16 : tid / 16; }
  static SPAFL_HD int col0(int tid) { return P::kCFastM ? tid / 16 : tid % 16; }

  static SPAFL_HD void clear(Frag& f) {
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) f.v[i][j] = Acc(0);
  }

  static SPAFL_HD void load(const P& p, Smem& s, int tid, int64_t m0, int64_t n0, int64_t k0, const Extents& ext) {
    load_tile_a<P, BM, BK, THREADS>(p, &s.a[0][0], 1, BM + 1, tid, m0, k0, ext);
    load_tile_b<P, BK, BN, THREADS>(p, &s.b[0][0], BN + 1, 1, tid, k0, n0, ext);
  }

  static SPAFL_HD void compute(const Smem& s, int tid, Frag& f) {
    const int r = row0(tid), c = col0(tid);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = to_acc(s.a[kk][r + 16 * i]);
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = to_acc(s.b[kk][c + 16 * j]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) f.v[i][j] += av[i] * bv[j];
    }
  }

  static SPAFL_HD void store(const P& p, int tid, int64_t m0, int64_t n0, const Extents& ext, const Frag& f) {
    const int r = row0(tid), c = col0(tid);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t m = m0 + r + 16 * i, n = n0 + c + 16 * j;
        if (m < ext.m && n < ext.n) p.store(m, n, f.v[i][j]);
      }
  }
};

// ------------------------------------------------------------------------------------------- WMMA

// 128 threads = 4 warps as 2 x 2; warp w computes the 32 x 32 block at (warp_row(w), warp_col(w)) as
// 2 x 2 fragments of 16 x 16, over k steps of 16.
template <class P>
struct WmmaGemm {
  using T = typename P::Elem;
  static constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
  // Leading dimensions: wmma wants multiples of 8 halves / 4 floats; the padding spreads rows over banks.
  static constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;

  struct Operands {  // row-major, as wmma::load_matrix_sync reads them with row_major layouts
    T a[BM][LDA];
    T b[BK][LDB];
  };
  // After the main loop the fp32 results reuse the operands' bytes (BM x LDC floats).
  static constexpr size_t kSmemBytes = sizeof(Operands) > sizeof(float) * BM* LDC ? sizeof(Operands)
                                                                                  : sizeof(float) * BM * LDC;

  // wmma fragment pointers must be 32-byte aligned: every origin below is, given a 128-byte aligned base.
  static_assert(sizeof(T) == 2, "WMMA engine: 16-bit elements");
  static_assert((16 * LDA * sizeof(T)) % 32 == 0 && (16 * sizeof(T)) % 32 == 0, "A fragment origins aligned");
  static_assert((16 * LDB * sizeof(T)) % 32 == 0, "B fragment origins aligned");
  static_assert(sizeof(T) * BM * LDA % 32 == 0, "B tile starts aligned");
  static_assert((16 * LDC * sizeof(float)) % 32 == 0 && (16 * sizeof(float)) % 32 == 0, "C origins aligned");
  static_assert(LDA % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "wmma leading dimensions");

  static SPAFL_HD int warp_row(int warp) { return (warp / 2) * 32; }
  static SPAFL_HD int warp_col(int warp) { return (warp % 2) * 32; }

  static SPAFL_HD void load(const P& p, Operands& s, int tid, int64_t m0, int64_t n0, int64_t k0, const Extents& ext) {
    load_tile_a<P, BM, BK, THREADS>(p, &s.a[0][0], LDA, 1, tid, m0, k0, ext);
    load_tile_b<P, BK, BN, THREADS>(p, &s.b[0][0], LDB, 1, tid, k0, n0, ext);
  }

  static SPAFL_HD void store(const P& p, const float (*c)[LDC], int tid, int64_t m0, int64_t n0, const Extents& ext) {
    for (int e = tid; e < BM * BN; e += THREADS) {
      const int mm = P::kCFastM ? e % BM : e / BN;
      const int nn = P::kCFastM ? e / BM : e % BN;
      const int64_t m = m0 + mm, n = n0 + nn;
      if (m < ext.m && n < ext.n) p.store(m, n, c[mm][nn]);
    }
  }
};

template <class T>
struct UsesTensorCores {
  static constexpr bool value = sizeof(T) == 2;  // __half, __nv_bfloat16
};

#ifdef __CUDACC__

// minBlocksPerMultiprocessor = 1 on both kernels: without it ptxas (CUDA 13) picked register budgets low
// enough to spill a few bytes in some sm_90 instantiations; with it none spills (tools/cuda_check.py).
template <class P>
__global__ void __launch_bounds__(SimtGemm<P>::THREADS, 1) simt_gemm_kernel(const P p) {
  using G = SimtGemm<P>;
  __shared__ typename G::Smem smem;
  const int64_t m0 = int64_t(blockIdx.x) * G::BM, n0 = int64_t(blockIdx.y) * G::BN;
  Extents ext;
  if (!block_extents(p, m0, n0, ext)) return;  // uniform over the block: before any barrier
  typename G::Frag f;
  G::clear(f);
  for (int64_t k0 = 0; k0 < ext.k; k0 += G::BK) {
    G::load(p, smem, threadIdx.x, m0, n0, k0, ext);
    __syncthreads();
    G::compute(smem, threadIdx.x, f);
    __syncthreads();
  }
  G::store(p, threadIdx.x, m0, n0, ext, f);
}

template <class P>
__global__ void __launch_bounds__(WmmaGemm<P>::THREADS, 1) wmma_gemm_kernel(const P p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using G = WmmaGemm<P>;
  using T = typename G::T;
  __shared__ __align__(128) unsigned char smem[G::kSmemBytes];
  auto& ops = *reinterpret_cast<typename G::Operands*>(smem);
  auto c = reinterpret_cast<float (*)[G::LDC]>(smem);

  const int64_t m0 = int64_t(blockIdx.x) * G::BM, n0 = int64_t(blockIdx.y) * G::BN;
  Extents ext;
  if (!block_extents(p, m0, n0, ext)) return;  // uniform over the block: before any barrier
  const int warp = threadIdx.x / 32;
  const int r0 = G::warp_row(warp), c0 = G::warp_col(warp);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < ext.k; k0 += G::BK) {
    G::load(p, ops, threadIdx.x, m0, n0, k0, ext);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < G::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &ops.a[r0 + 16 * i][kk], G::LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &ops.b[kk][c0 + 16 * j], G::LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the next load (or the results below) overwrites what the warps just read
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c[r0 + 16 * i][c0 + 16 * j], acc[i][j], G::LDC, wmma::mem_row_major);
  __syncthreads();
  G::store(p, c, threadIdx.x, m0, n0, ext);
#else
  __trap();  // tensor-core kernels target sm_80+; the Python backend refuses older devices
#endif
}

#endif  // __CUDACC__

}  // namespace spafl
