// Per-row kernels: scores, row selection (stream compaction on the device) and the parameter gradients
// that turn the dense weight gradient of the needed rows into dW, db and dtau (docs/DESIGN.md §2).
//
// As in gemm.cuh, each kernel is a thin shell around SPAFL_HD per-thread phases that
// tests/cuda_emulation.cpp also runs on the host; only the block-wide reductions and scans (CUB) are
// device-only.
#pragma once

#include "common.cuh"

#ifdef __CUDACC__
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

namespace spafl {

// score[row] = mean |weight[row, :]| - threshold[row]; one block per row, summed in the order
// semantics.row_score defines (bit for bit the other backends' scores): one thread per lane.
template <class T>
struct RowScores {
  using Acc = typename Num<T>::Acc;
  static constexpr int THREADS = 256 / sizeof(Acc);  // the lanes, semantics.score_lanes: 64 float, 32 double
  const T* weight;
  const T* threshold;
  Acc* score;
  int64_t rows, fan_in;

  // Lane tid: |w[j]| for j = tid, tid + THREADS, ... in increasing j.
  SPAFL_HD Acc lane_l1(int64_t row, int tid) const {
    const T* w = weight + row * fan_in;
    Acc sum = 0;
    for (int64_t j = tid; j < fan_in; j += THREADS) sum += abs_value(to_acc(w[j]));
    return sum;
  }
  // One step of the fold by halves, for thread tid: lane[tid] += lane[tid + half] when tid < half.
  static SPAFL_HD void fold(Acc* lane, int tid, int half) {
    if (tid < half) lane[tid] += lane[tid + half];
  }
  SPAFL_HD void finish(int64_t row, Acc l1) const {
    score[row] = l1 / Acc(fan_in > 0 ? fan_in : 1) - to_acc(threshold[row]);  // IEEE division (no fast math)
  }
};

// Rows with score > 0, or also those with an open gate (ste >= 0), compacted in ascending order into
// index[0:count]; the rest of index holds the other rows ascending (complement) or -1. One block.
template <class A>
struct SelectRows {
  static constexpr int THREADS = 512;
  const A* score;
  int64_t rows;
  int ste;
  int complement;
  int64_t* index;
  int64_t* count;

  SPAFL_HD bool selected(int64_t row) const {
    const A s = score[row];
    return !(s <= A(0)) || gate_open(s, ste);  // a NaN score counts as active
  }
  // Flag of thread tid in the chunk starting at `base`: in range and (not) selected.
  SPAFL_HD int flag(int64_t base, int tid, bool want_selected) const {
    const int64_t row = base + tid;
    return row < rows && selected(row) == want_selected;
  }
};

// dW, db, dtau of one row from its dense weight gradient (spafl_cuda_param_grads); one block per row.
template <class T>
struct ParamGrads {
  using Acc = typename Num<T>::Acc;
  static constexpr int THREADS = 256;
  const Acc* score;
  int ste;
  const T* weight;
  const T* bias;
  const T* grad_y;
  T* dweight;
  T* dbias;
  T* dthreshold;
  int64_t rows, fan_in, outer, inner;

  SPAFL_HD bool active(int64_t row) const { return !(score[row] <= Acc(0)); }  // NaN: active
  // Rows that are pruned with a closed gate get all-zero gradients and need no G.
  SPAFL_HD bool needs_gradient(int64_t row) const { return active(row) || gate_open(score[row], ste); }

  SPAFL_HD void write_zeros(int64_t row, int tid) const {
    for (int64_t j = tid; j < fan_in; j += THREADS) dweight[row * fan_in + j] = zero<T>();
    if (tid == 0) {
      dthreshold[row] = zero<T>();
      if (dbias) dbias[row] = zero<T>();
    }
  }
  // <G_row, W_row>, this thread's share (dweight holds G on entry).
  SPAFL_HD Acc partial_dot(int64_t row, int tid) const {
    Acc sum = 0;
    for (int64_t j = tid; j < fan_in; j += THREADS)
      sum += to_acc(dweight[row * fan_in + j]) * to_acc(weight[row * fan_in + j]);
    return sum;
  }
  // sum of dL/dy over batch (and space) for this row, this thread's share; only needed with a bias.
  SPAFL_HD Acc partial_grad_sum(int64_t row, int tid) const {
    Acc sum = 0;
    if (!bias) return sum;
    for (int64_t e = tid; e < outer * inner; e += THREADS) {
      const int64_t o = e / inner, s = e % inner;
      sum += to_acc(grad_y[(o * rows + row) * inner + s]);
    }
    return sum;
  }
  // One thread, with the block's sums: writes dthreshold and dbias, returns the STE term's scale
  // gate * dL/dm / fan_in for write_row.
  SPAFL_HD Acc finish(int64_t row, Acc dot, Acc grad_sum) const {
    const bool gate = gate_open(score[row], ste);
    const Acc dm = dot + (bias ? to_acc(bias[row]) * grad_sum : Acc(0));
    dthreshold[row] = from_acc<T>(gate ? -dm : Acc(0));
    if (dbias) dbias[row] = from_acc<T>(active(row) ? grad_sum : Acc(0));
    return gate ? dm / Acc(fan_in > 0 ? fan_in : 1) : Acc(0);
  }
  // dW_row = m_row G_row + scale * sign(W_row), in place over G.
  SPAFL_HD void write_row(int64_t row, int tid, Acc scale) const {
    const bool keep = active(row);
    for (int64_t j = tid; j < fan_in; j += THREADS) {
      const int64_t idx = row * fan_in + j;
      const Acc g = keep ? to_acc(dweight[idx]) : Acc(0);
      dweight[idx] = from_acc<T>(g + scale * sign_of(to_acc(weight[idx])));
    }
  }
};

#ifdef __CUDACC__

template <class T>
__global__ void __launch_bounds__(RowScores<T>::THREADS) row_scores_kernel(const RowScores<T> p) {
  using Acc = typename RowScores<T>::Acc;
  __shared__ Acc lane[RowScores<T>::THREADS];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  lane[tid] = p.lane_l1(row, tid);
  __syncthreads();
  for (int half = RowScores<T>::THREADS / 2; half > 0; half /= 2) {
    RowScores<T>::fold(lane, tid, half);
    __syncthreads();
  }
  if (tid == 0) p.finish(row, lane[0]);
}

template <class A>
__global__ void __launch_bounds__(SelectRows<A>::THREADS) select_rows_kernel(const SelectRows<A> p) {
  using Scan = cub::BlockScan<int, SelectRows<A>::THREADS>;
  __shared__ typename Scan::TempStorage temp;
  const int tid = threadIdx.x;
  // Selected rows: each chunk's exclusive prefix sum of flags is the position after those before it.
  int64_t offset = 0;
  for (int64_t base = 0; base < p.rows; base += SelectRows<A>::THREADS) {
    const int flag = p.flag(base, tid, true);
    int pos, chunk_total;
    Scan(temp).ExclusiveSum(flag, pos, chunk_total);  // chunk_total reaches every thread
    if (flag) p.index[offset + pos] = base + tid;
    offset += chunk_total;
    __syncthreads();  // temp is reused by the next scan
  }
  const int64_t selected = offset;
  if (tid == 0) *p.count = selected;
  if (p.complement) {
    offset = selected;
    for (int64_t base = 0; base < p.rows; base += SelectRows<A>::THREADS) {
      const int flag = p.flag(base, tid, false);
      int pos, chunk_total;
      Scan(temp).ExclusiveSum(flag, pos, chunk_total);
      if (flag) p.index[offset + pos] = base + tid;
      offset += chunk_total;
      __syncthreads();
    }
  } else {
    for (int64_t i = selected + tid; i < p.rows; i += SelectRows<A>::THREADS) p.index[i] = -1;
  }
}

template <class T>
__global__ void __launch_bounds__(ParamGrads<T>::THREADS) param_grads_kernel(const ParamGrads<T> p) {
  using Acc = typename ParamGrads<T>::Acc;
  using Reduce = cub::BlockReduce<Acc, ParamGrads<T>::THREADS>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ Acc scale;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  if (!p.needs_gradient(row)) {  // uniform over the block: every thread reads the same score
    p.write_zeros(row, tid);
    return;
  }
  const Acc dot = Reduce(temp).Sum(p.partial_dot(row, tid));
  __syncthreads();  // temp is reused
  const Acc grad_sum = Reduce(temp).Sum(p.partial_grad_sum(row, tid));
  if (tid == 0) scale = p.finish(row, dot, grad_sum);
  __syncthreads();  // publishes scale; every thread has read G for the dot before it is overwritten
  p.write_row(row, tid, scale);
}

#endif  // __CUDACC__

// Shared launcher logic (dtype dispatch, argument packing) for the device (launch.cuh) and the host
// emulation: Exec provides row_scores(RowScores<T>), select_rows(SelectRows<A>), param_grads(ParamGrads<T>).

template <class Exec>
cudaError_t run_row_scores(const Exec& exec, int dtype, const void* weight, const void* threshold, void* score,
                           int64_t rows, int64_t fan_in) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename Num<T>::Acc;
    return exec.row_scores(RowScores<T>{static_cast<const T*>(weight), static_cast<const T*>(threshold),
                                        static_cast<Acc*>(score), rows, fan_in});
  });
}

template <class Exec>
cudaError_t run_select_rows(const Exec& exec, int dtype, const void* score, int64_t rows, int ste, int complement,
                            int64_t* index, int64_t* count) {
  if (rows < 0 || rows > INT32_MAX) return cudaErrorInvalidValue;  // block scan positions are int
  return dispatch_dtype(dtype, [&](auto tag) {
    using Acc = typename Num<typename decltype(tag)::type>::Acc;
    return exec.select_rows(SelectRows<Acc>{static_cast<const Acc*>(score), rows, ste, complement, index, count});
  });
}

template <class Exec>
cudaError_t run_param_grads(const Exec& exec, int dtype, const void* score, int ste, const void* weight,
                            const void* bias, const void* grad_y, void* dweight, void* dbias, void* dthreshold,
                            int64_t rows, int64_t fan_in, int64_t outer, int64_t inner) {
  if ((bias == nullptr) != (dbias == nullptr)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename Num<T>::Acc;
    return exec.param_grads(ParamGrads<T>{static_cast<const Acc*>(score), ste, static_cast<const T*>(weight),
                                          static_cast<const T*>(bias), static_cast<const T*>(grad_y),
                                          static_cast<T*>(dweight), static_cast<T*>(dbias), static_cast<T*>(dthreshold),
                                          rows, fan_in, outer, inner});
  });
}

}  // namespace spafl
