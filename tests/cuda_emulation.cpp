// Host emulation of the CUDA kernels, for machines without a GPU (tests/test_cuda_emulation.py).
//
// Compiled by the host C++ compiler against the CUDA headers (no nvcc, no GPU): it includes the same
// headers as csrc/cuda/*.cu and runs the same launcher logic (run_* templates: dtype dispatch, argument
// packing, problem definitions with all their index math) through HostExec instead of DeviceExec.
// HostExec replays every kernel block by block: each per-thread phase (SPAFL_HD functions) for all
// threads of the block in turn, phases in the order the kernel separates them with __syncthreads().
// What it cannot check: the CUB block reductions and scans (replaced by sequential sums), the wmma
// fragment operations (replaced by 16x16x16 products at the same tile origins) and real concurrency.
#include <cstring>
#include <memory>
#include <vector>

#include "conv2d.cuh"
#include "linear.cuh"
#include "rows.cuh"

namespace {

using namespace spafl;

// The grid of DeviceExec::gemm (one block per G::BM x G::BN tile of the bounds), minus the blocks that
// exit at once; calls block(m0, n0, extents) for the others.
template <class G, class P, class Block>
void for_each_block(const P& p, Block&& block) {
  const int64_t grid_m = ceil_div(p.m_bound(), G::BM), grid_n = ceil_div(p.n_bound(), G::BN);
  for (int64_t bx = 0; bx < grid_m; ++bx)
    for (int64_t by = 0; by < grid_n; ++by) {
      const int64_t m0 = bx * G::BM, n0 = by * G::BN;
      Extents ext;
      if (block_extents(p, m0, n0, ext)) block(m0, n0, ext);
    }
}

template <class P>
void emulate_simt(const P& p) {
  using G = SimtGemm<P>;
  auto smem = std::make_unique<typename G::Smem>();
  std::vector<typename G::Frag> frags(G::THREADS);
  for_each_block<G>(p, [&](int64_t m0, int64_t n0, const Extents& ext) {
    for (auto& f : frags) G::clear(f);
    for (int64_t k0 = 0; k0 < ext.k; k0 += G::BK) {
      for (int tid = 0; tid < G::THREADS; ++tid) G::load(p, *smem, tid, m0, n0, k0, ext);
      for (int tid = 0; tid < G::THREADS; ++tid) G::compute(*smem, tid, frags[tid]);
    }
    for (int tid = 0; tid < G::THREADS; ++tid) G::store(p, tid, m0, n0, ext, frags[tid]);
  });
}

template <class P>
void emulate_wmma(const P& p) {
  using G = WmmaGemm<P>;
  // The kernel's shared memory: operands, later reused for the fp32 results, 128-byte aligned.
  std::vector<unsigned char> storage(G::kSmemBytes + 128);
  void* raw = storage.data() + (128 - reinterpret_cast<uintptr_t>(storage.data()) % 128) % 128;
  auto& ops = *static_cast<typename G::Operands*>(raw);
  auto c = static_cast<float (*)[G::LDC]>(raw);
  constexpr int WARPS = G::THREADS / 32;
  std::vector<float> acc(WARPS * 2 * 2 * 16 * 16);
  auto fragment = [&](int warp, int i, int j) { return acc.data() + ((warp * 2 + i) * 2 + j) * 256; };

  for_each_block<G>(p, [&](int64_t m0, int64_t n0, const Extents& ext) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < ext.k; k0 += G::BK) {
      for (int tid = 0; tid < G::THREADS; ++tid) G::load(p, ops, tid, m0, n0, k0, ext);
      // mma_sync on fragments loaded from &ops.a[r0 + 16 i][kk] and &ops.b[kk][c0 + 16 j], as the kernel.
      for (int warp = 0; warp < WARPS; ++warp) {
        const int r0 = G::warp_row(warp), c0 = G::warp_col(warp);
        for (int kk = 0; kk < G::BK; kk += 16)
          for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) {
              const auto* a = &ops.a[r0 + 16 * i][kk];
              const auto* b = &ops.b[kk][c0 + 16 * j];
              float* d = fragment(warp, i, j);
              for (int r = 0; r < 16; ++r)
                for (int col = 0; col < 16; ++col) {
                  float sum = d[r * 16 + col];
                  for (int t = 0; t < 16; ++t) sum += to_acc(a[r * G::LDA + t]) * to_acc(b[t * G::LDB + col]);
                  d[r * 16 + col] = sum;
                }
            }
      }
    }
    for (int warp = 0; warp < WARPS; ++warp) {  // store_matrix_sync(&c[r0 + 16 i][c0 + 16 j], ..., LDC)
      const int r0 = G::warp_row(warp), c0 = G::warp_col(warp);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          float* out = &c[r0 + 16 * i][c0 + 16 * j];
          const float* d = fragment(warp, i, j);
          for (int r = 0; r < 16; ++r)
            for (int col = 0; col < 16; ++col) out[r * G::LDC + col] = d[r * 16 + col];
        }
    }
    for (int tid = 0; tid < G::THREADS; ++tid) G::store(p, c, tid, m0, n0, ext);
  });
}

struct HostExec {
  template <class P>
  cudaError_t gemm(const P& p) const {
    if constexpr (UsesTensorCores<typename P::Elem>::value) {
      emulate_wmma(p);
    } else {
      emulate_simt(p);
    }
    return cudaSuccess;
  }

  template <class T>
  cudaError_t row_scores(const RowScores<T>& p) const {
    typename RowScores<T>::Acc lane[RowScores<T>::THREADS];
    for (int64_t row = 0; row < p.rows; ++row) {
      for (int tid = 0; tid < RowScores<T>::THREADS; ++tid) lane[tid] = p.lane_l1(row, tid);
      for (int half = RowScores<T>::THREADS / 2; half > 0; half /= 2)
        for (int tid = 0; tid < RowScores<T>::THREADS; ++tid) RowScores<T>::fold(lane, tid, half);
      p.finish(row, lane[0]);
    }
    return cudaSuccess;
  }

  template <class A>
  cudaError_t select_rows(const SelectRows<A>& p) const {
    constexpr int THREADS = SelectRows<A>::THREADS;
    // The kernel's chunks, with BlockScan::ExclusiveSum done sequentially.
    auto pass = [&](bool want_selected, int64_t offset) {
      for (int64_t base = 0; base < p.rows; base += THREADS) {
        int pos = 0;
        for (int tid = 0; tid < THREADS; ++tid) {
          const int flag = p.flag(base, tid, want_selected);
          if (flag) p.index[offset + pos] = base + tid;
          pos += flag;
        }
        offset += pos;
      }
      return offset;
    };
    const int64_t selected = pass(true, 0);
    *p.count = selected;
    if (p.complement) {
      pass(false, selected);
    } else {
      for (int64_t i = selected; i < p.rows; ++i) p.index[i] = -1;
    }
    return cudaSuccess;
  }

  template <class T>
  cudaError_t param_grads(const ParamGrads<T>& p) const {
    using Acc = typename ParamGrads<T>::Acc;
    constexpr int THREADS = ParamGrads<T>::THREADS;
    for (int64_t row = 0; row < p.rows; ++row) {
      if (!p.needs_gradient(row)) {
        for (int tid = 0; tid < THREADS; ++tid) p.write_zeros(row, tid);
        continue;
      }
      Acc dot = 0, grad_sum = 0;
      for (int tid = 0; tid < THREADS; ++tid) dot += p.partial_dot(row, tid);
      for (int tid = 0; tid < THREADS; ++tid) grad_sum += p.partial_grad_sum(row, tid);
      const Acc scale = p.finish(row, dot, grad_sum);
      for (int tid = 0; tid < THREADS; ++tid) p.write_row(row, tid, scale);
    }
    return cudaSuccess;
  }
};

}  // namespace

// The launchers of spafl_cuda.h, same arguments minus the stream, running on host memory.
extern "C" {

int spafl_emu_row_scores(int dtype, const void* weight, const void* threshold, void* score, int64_t rows,
                         int64_t fan_in) {
  return run_row_scores(HostExec{}, dtype, weight, threshold, score, rows, fan_in);
}

int spafl_emu_select_rows(int dtype, const void* score, int64_t rows, int ste, int complement, int64_t* index,
                          int64_t* count) {
  return run_select_rows(HostExec{}, dtype, score, rows, ste, complement, index, count);
}

int spafl_emu_param_grads(int dtype, const void* score, int ste, const void* weight, const void* bias,
                          const void* grad_y, void* dweight, void* dbias, void* dthreshold, int64_t rows,
                          int64_t fan_in, int64_t outer, int64_t inner) {
  return run_param_grads(HostExec{}, dtype, score, ste, weight, bias, grad_y, dweight, dbias, dthreshold, rows, fan_in,
                         outer, inner);
}

int spafl_emu_linear_fwd(int dtype, const void* x, const void* weight, const void* bias, const int64_t* perm,
                         const int64_t* count, void* y, int64_t M, int64_t N, int64_t K) {
  return run_linear_fwd(HostExec{}, dtype, x, weight, bias, perm, count, y, M, N, K);
}

int spafl_emu_linear_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active, const int64_t* count,
                        void* dx, int64_t M, int64_t N, int64_t K) {
  return run_linear_dx(HostExec{}, dtype, grad_y, weight, active, count, dx, M, N, K);
}

int spafl_emu_linear_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows, const int64_t* count,
                        void* dweight, int64_t M, int64_t N, int64_t K) {
  return run_linear_dw(HostExec{}, dtype, grad_y, x, rows, count, dweight, M, N, K);
}

int spafl_emu_conv2d_fwd(int dtype, const void* x, const void* weight, const void* bias, const int64_t* perm,
                         const int64_t* count, void* y, const SpaflConvShape* shape) {
  return run_conv2d_fwd(HostExec{}, dtype, x, weight, bias, perm, count, y, shape);
}

int spafl_emu_conv2d_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active, const int64_t* count,
                        void* dx, const SpaflConvShape* shape) {
  return run_conv2d_dx(HostExec{}, dtype, grad_y, weight, active, count, dx, shape);
}

int spafl_emu_conv2d_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows, const int64_t* count,
                        void* dweight, const SpaflConvShape* shape) {
  return run_conv2d_dw(HostExec{}, dtype, grad_y, x, rows, count, dweight, shape);
}

}  // extern "C"
