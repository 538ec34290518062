// Row machinery shared by the CPU kernels of the `cpp` backend (docs/DESIGN.md §2): scores, the active and
// graded row sets, gathers into compact panels, outputs on fresh zero pages, the per-row gradient epilogue.
//
// A layer's weight is [N, fan_in] (a Conv2d filter flattened). Row i is active when
// s_i = mean|W_i| - tau_i > 0; it is "graded" (needs its weight gradient G_i) when active, or when
// pruned with an open STE gate (then only for dL/dm_i = <G_i, W_i> + b_i * sum(g_i)).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "../spafl_ste.h"

namespace spafl::cpu {

// ---------------------------------------------------------------------------- vector kernels
// Defined in rows.cpp, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time: the
// extension is built without -march flags, and these loops are the bandwidth-bound part of each op.

float abs_sum(const float* p, int64_t n);
double abs_sum(const double* p, int64_t n);
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// out[j] = (keep ? g[j] : 0) + c * sign(w[j]); `out` may alias `g`.
void grad_row(float* out, const float* g, const float* w, bool keep, float c, int64_t n);
void grad_row(double* out, const double* g, const double* w, bool keep, double c, int64_t n);

// ---------------------------------------------------------------------------------- row sets

// The op's `int ste` as a SpaflSte; raises for a code that names no STE.
SpaflSte ste_from_code(int64_t code);

template <typename T>
inline bool gate_open(T score, SpaflSte ste) {
  // Negated comparisons: a NaN score has its gate open, as in the reference (semantics.is_active).
  const T a = score < 0 ? -score : score;
  return ste == SPAFL_STE_IDENTITY || (ste == SPAFL_STE_OUTER ? !(a <= T(1)) : !(a > T(1)));
}

// s_i = sum_j |W_ij| / fan_in - tau_i for every row, rows split across threads. weight: [N, ...]
// contiguous, float32 or float64; threshold: [N] in the weight's dtype. Returns [N] in the weight's dtype
// (the accumulation dtype of both).
at::Tensor row_scores(const at::Tensor& weight, const at::Tensor& threshold);

// ---------------------------------------------------------------------------------- parallel

// Grain of at::parallel_for for items of `item_size` elements each: a thread gets at least ~1M
// elements (a few hundred microseconds of memory traffic), so small layers and small steps run
// inline instead of paying for a parallel region, which costs far more than its fork when a core is
// shared and the other thread is descheduled.
inline int64_t grain(int64_t item_size) {
  constexpr int64_t kParallelWork = int64_t(1) << 20;
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(item_size, 1));
}

// Grain for passes that run right after a multithreaded op, whose threads are still awake, so that a
// parallel region costs little: ~64K elements per thread. Used by the gradient epilogue (GradRows,
// after the GEMM that made G, which then lies half in each core's cache) and by RowSets::drop_silent (after the
// backward of the op behind the layer).
inline int64_t warm_grain(int64_t item_size) {
  constexpr int64_t kWarmWork = int64_t(1) << 16;
  return std::max<int64_t>(1, kWarmWork / std::max<int64_t>(item_size, 1));
}

// Whether v[0:n) is all zeros (-0.0 is zero, NaN is not): blocks of 64 checked without a branch, so
// the compiler vectorises them, stopping after the first block holding a non-zero.
template <typename T>
bool all_zero(const T* v, int64_t n) {
  constexpr int64_t kBlock = 64;
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) {
    int nonzero = 0;
#pragma omp simd reduction(| : nonzero)
    for (int64_t k = 0; k < kBlock; ++k) nonzero |= !(v[j + k] == T(0));
    if (nonzero) return false;
  }
  for (; j < n; ++j) {
    if (!(v[j] == T(0))) return false;
  }
  return true;
}

// flags[c] |= (src[o, c] != 0) over the rows o of a matrix src [rows, width], for its columns [c0, c1),
// streaming row by row (a column-wise scan strides through memory). Every 16 rows it stops once `done()`
// says nothing is left to find (a dense matrix: about 16 rows read, not all). -0.0 is zero, NaN is not.
template <typename T, typename Done>
void flag_nonzero_columns(const T* src, int64_t rows, int64_t width, int64_t c0, int64_t c1, uint8_t* flags,
                          Done done) {
  for (int64_t o = 0; o < rows; ++o) {
    const T* row = src + o * width;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) flags[c] |= static_cast<uint8_t>(!(row[c] == T(0)));
    if (o % 16 == 15 && done()) break;
  }
}

// Index sets over the N rows, from the scores (ascending indices).
struct RowSets {
  int64_t n = 0;
  std::vector<int64_t> active;  // m_i = 1
  std::vector<int64_t> graded;  // active, or pruned with an open gate; empty unless with_gates
  std::vector<uint8_t> mask;    // [N] m_i
  std::vector<uint8_t> gate;    // [N] gate(s_i); empty unless with_gates

  template <typename T>
  RowSets(const T* score, int64_t rows, SpaflSte ste, bool with_gates) : n(rows), mask(rows) {
    active.reserve(rows);
    if (with_gates) {
      gate.resize(rows);
      graded.reserve(rows);
    }
    for (int64_t i = 0; i < rows; ++i) {
      mask[i] = !(score[i] <= T(0));  // a NaN score counts as active (semantics.is_active)
      if (mask[i]) active.push_back(i);
      if (with_gates) {
        gate[i] = gate_open(score[i], ste);
        if (mask[i] || gate[i]) graded.push_back(i);
      }
    }
  }
  int64_t num_active() const { return static_cast<int64_t>(active.size()); }
  // v[i] = 0 for every pruned row i. v: [N].
  template <typename T>
  void zero_pruned(T* v) const {
    for (int64_t i = 0; i < n; ++i)
      if (!mask[i]) v[i] = T(0);
  }
  int64_t num_graded() const { return static_cast<int64_t>(graded.size()); }
  // Drops from `graded` the pruned rows whose incoming gradient is zero over the whole batch (and
  // space): their dL/dm = sum g * (z + b) is exactly 0, so all their gradients are 0 and they need no
  // G (docs/DESIGN.md §5, exact extra skipping). Behind a ReLU every pruned row is one: it outputs 0, and
  // ReLU's gradient at 0 is 0. A NaN gradient is not zero: such a row stays graded. g: [outer, n, inner].
  template <typename T>
  void drop_silent(const T* g, int64_t outer, int64_t inner) {
    std::vector<uint8_t> keep(graded.size());
    if (inner == 1) {
      // Columns of a matrix g [outer, n]: stop once every graded row is known to be kept.
      std::vector<uint8_t> kept_row(mask);  // active rows are kept whatever their gradient
      uint8_t* k = kept_row.data();
      flag_nonzero_columns(g, outer, n, 0, n, k, [&] {
        return std::all_of(graded.begin(), graded.end(), [k](int64_t i) { return k[i] != 0; });
      });
      for (size_t p = 0; p < graded.size(); ++p) keep[p] = kept_row[graded[p]];
    } else {
      at::parallel_for(0, static_cast<int64_t>(graded.size()), warm_grain(outer * inner), [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          const int64_t i = graded[p];
          bool silent = !mask[i];
          for (int64_t o = 0; silent && o < outer; ++o) silent = all_zero(g + (o * n + i) * inner, inner);
          keep[p] = !silent;
        }
      });
    }
    std::vector<int64_t> kept;
    kept.reserve(graded.size());
    for (size_t p = 0; p < graded.size(); ++p) {
      if (keep[p]) kept.push_back(graded[p]);
    }
    graded.swap(kept);
  }
};

// ------------------------------------------------------------------------------ masked dense

// v[o, i, :] = 0 for o < outer and every pruned row i: the pruned columns (inner == 1) or planes of an
// output [outer, n, inner] that a dense op computed for every row.
template <typename T>
void zero_pruned_planes(T* v, int64_t outer, const RowSets& rows, int64_t inner) {
  const int64_t n = rows.n;
  const uint8_t* mask = rows.mask.data();
  at::parallel_for(0, outer, grain(n * inner), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      T* r = v + o * n * inner;
      if (inner == 1) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) r[i] = mask[i] ? r[i] : T(0);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          if (!mask[i]) std::memset(r + i * inner, 0, inner * sizeof(T));
        }
      }
    }
  });
}

// A copy of src [outer, n, inner] (contiguous) with its pruned rows' planes zeroed: the masked weight
// (outer 1) or the masked dL/dy (inner 1) of a masked-dense backward.
template <typename T>
at::Tensor masked_copy(const at::Tensor& src, int64_t outer, const RowSets& rows, int64_t inner) {
  at::Tensor out = at::empty(src.sizes(), src.options());
  const T* s = src.const_data_ptr<T>();
  T* d = out.mutable_data_ptr<T>();
  const int64_t n = rows.n;
  const uint8_t* mask = rows.mask.data();
  at::parallel_for(0, outer, grain(n * inner), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      if (inner == 1) {  // columns of a matrix: a select per element, not a memcpy call each
        const T* sr = s + o * n;
        T* dr = d + o * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dr[i] = mask[i] ? sr[i] : T(0);
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t at = (o * n + i) * inner;
        if (mask[i]) {
          std::memcpy(d + at, s + at, inner * sizeof(T));
        } else {
          std::memset(d + at, 0, inner * sizeof(T));
        }
      }
    }
  });
  return out;
}

// A stretch [begin, end) of positions in an ascending index list. `run`: the indices there are
// consecutive, so the rows they name already form a panel in place (no gather). Otherwise the rows
// are gathered into a panel of at most `chunk` rows.
struct Segment {
  int64_t begin, end;
  bool run;
  int64_t size() const { return end - begin; }
};

// Splits idx[0:n) into runs of at least `min_run` consecutive indices (or one run when all of them
// are consecutive) and gathered chunks of at most `chunk` positions, in order.
std::vector<Segment> segments(const int64_t* idx, int64_t n, int64_t chunk, int64_t min_run);

// Rows per gathered panel: a panel of [rows, fan_in] stays at most ~16 MiB, small enough that the
// allocator reuses it instead of mapping (and page-faulting) fresh memory on every call (glibc maps
// blocks of 32 MiB or more afresh each time), large enough that BLAS runs at full speed on it
// (measured, 1 thread, x[256, 4096]: 1024-row panels within noise of one GEMM on 2048 rows).
int64_t panel_rows(int64_t fan_in, int64_t elem_size, int64_t total_rows);
constexpr int64_t kMinRun = 64;

// ---------------------------------------------------------------------------------- memory

// A tensor on freshly mapped pages, for the large outputs the kernels write (dW, a Conv2d's y).
// Fresh anonymous pages read as zero until written, so rows a kernel never writes (pruned rows of
// dW, pruned planes of y) are neither zero-filled nor page-faulted in the op (a reader faults them
// in later at about a third of the cost of a write fault). Tensors under 2 MiB come from the default
// allocator: at::zeros if `zero`, else at::empty. SPAFL_CPU_HUGEPAGES=1: see rows.cpp.
at::Tensor fresh_pages(at::IntArrayRef sizes, const at::TensorOptions& options, bool zero);

// Once a kernel has written what it writes into a fresh_pages tensor: maps every page still unwritten
// to the kernel's shared zero page in one call (Linux >= 5.14, MADV_POPULATE_READ), so that whoever
// reads the tensor next (autograd accumulating dW, the optimizer, the next layer) takes no page
// fault per 4 KiB of pruned rows. No-op for small tensors and elsewhere.
void map_unwritten(const at::Tensor& fresh);

// ---------------------------------------------------------------------------------- gathers

// dst[o, j, :] = src[o, idx[j], :] for o < outer, j < n; src: [outer, rows, inner], dst: [outer, n,
// inner], both contiguous.
template <typename T>
void gather_planes(const T* src, int64_t outer, int64_t rows, int64_t inner, const int64_t* idx, int64_t n, T* dst) {
  if (inner == 1) {  // columns of a matrix: one element per index, parallel over the outer rows
    at::parallel_for(0, outer, grain(n), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const T* s = src + o * rows;
        T* d = dst + o * n;
        for (int64_t j = 0; j < n; ++j) d[j] = s[idx[j]];
      }
    });
    return;
  }
  at::parallel_for(0, outer * n, grain(inner), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t o = p / n, j = p % n;
      std::memcpy(dst + p * inner, src + (o * rows + idx[j]) * inner, inner * sizeof(T));
    }
  });
}

// dst[o, idx[j], :] = src[o, j, :] (+ bias[idx[j]]) for o < outer, j < n: the inverse of
// gather_planes, leaving dst's other rows as they are. bias may be null.
template <typename T>
void scatter_planes(const T* src, int64_t outer, int64_t n, int64_t inner, const int64_t* idx, int64_t rows,
                    const T* bias, T* dst) {
  at::parallel_for(0, outer * n, grain(inner), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t o = p / n, j = p % n;
      const T* s = src + p * inner;
      T* d = dst + (o * rows + idx[j]) * inner;
      if (bias) {
        const T add = bias[idx[j]];
        for (int64_t k = 0; k < inner; ++k) d[k] = s[k] + add;
      } else {
        std::memcpy(d, s, inner * sizeof(T));
      }
    }
  });
}

// out[r] = sum over o < outer, k < inner of src[o, r, k]: dL/dy summed over batch (and space) per
// row. src: [outer, rows, inner] contiguous; accumulated in double, like a pairwise sum accurate
// enough for the 10^5-element sums of a convolution.
template <typename T>
void plane_sums(const T* src, int64_t outer, int64_t rows, int64_t inner, T* out) {
  at::parallel_for(0, rows, grain(outer * inner), [&](int64_t b, int64_t e) {
    if (inner == 1) {  // columns of a matrix: stream its rows, one accumulator per column
      std::vector<double> acc(e - b, 0.0);
      for (int64_t o = 0; o < outer; ++o) {
        const T* s = src + o * rows + b;
        for (int64_t r = 0; r < e - b; ++r) acc[r] += static_cast<double>(s[r]);
      }
      for (int64_t r = b; r < e; ++r) out[r] = static_cast<T>(acc[r - b]);
      return;
    }
    for (int64_t r = b; r < e; ++r) {
      double acc = 0;
      for (int64_t o = 0; o < outer; ++o) {
        const T* s = src + (o * rows + r) * inner;
        double part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t k = 0; k < inner; ++k) part += static_cast<double>(s[k]);
        acc += part;
      }
      out[r] = static_cast<T>(acc);
    }
  });
}

// ------------------------------------------------------------------------------ live inputs

// The planes of an input x [outer, planes, inner] that the product reads: the input columns of a
// Linear (x [M, K]: outer = M, inner = 1) or channels of a Conv2d (x [B, C, H, W]: outer = B, inner =
// H*W). A plane that is zero over the whole batch (an input behind a pruned row and ReLU, max-pool,
// GELU, dropout, flatten) adds nothing to the forward product or to the weight gradient G = g^T x, so
// the ops drop it from x and from the weight rows (a chain of sparse layers then costs about
// density_in * density_out of dense). `skip` is false, and `live` empty, when that is not exact or not
// worth a gather: x is not contiguous; fewer than an eighth of the planes are dead; or an active row has
// a non-finite score (a NaN or infinite weight times a zero input is NaN in the dense product, and must
// stay so). A NaN input counts as non-zero.
struct LiveInputs {
  bool skip = false;
  std::vector<int64_t> live;  // ascending plane indices, when skip
};

template <typename T>
LiveInputs live_inputs(const at::Tensor& x, int64_t outer, int64_t planes, int64_t inner, const T* score,
                       const std::vector<int64_t>& active) {
  LiveInputs out;
  if (!x.is_contiguous() || planes < 8) return out;
  for (const int64_t i : active) {
    if (!std::isfinite(score[i])) return out;
  }
  const T* src = x.const_data_ptr<T>();
  std::vector<uint8_t> is_live(planes, 0);
  if (inner == 1) {  // columns of a matrix: stop once every column is live
    at::parallel_for(0, planes, grain(outer), [&](int64_t b, int64_t e) {
      uint8_t* live = is_live.data();
      flag_nonzero_columns(src, outer, planes, b, e, live,
                           [&] { return std::all_of(live + b, live + e, [](uint8_t v) { return v != 0; }); });
    });
  }
  // A live plane is usually found at its first element: the pass reads about `planes` elements plus
  // every element of the dead planes.
  at::parallel_for(0, inner == 1 ? 0 : planes, grain(outer * inner), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      for (int64_t o = 0; o < outer && !is_live[p]; ++o) is_live[p] = !all_zero(src + (o * planes + p) * inner, inner);
    }
  });
  for (int64_t p = 0; p < planes; ++p) {
    if (is_live[p]) out.live.push_back(p);
  }
  out.skip = static_cast<int64_t>(out.live.size()) * 8 <= planes * 7;
  if (!out.skip) out.live.clear();
  return out;
}

// x's live planes (in.live) as a contiguous tensor: [M, L] for a Linear's x [M, K], [B, L, H, W] for a
// Conv2d's x [B, C, H, W]. x is contiguous (live_inputs skips nothing otherwise).
template <typename T>
at::Tensor gather_live(const at::Tensor& x, const LiveInputs& in) {
  std::vector<int64_t> sizes = x.sizes().vec();
  const int64_t outer = sizes[0], planes = sizes[1], L = static_cast<int64_t>(in.live.size());
  int64_t inner = 1;
  for (size_t d = 2; d < sizes.size(); ++d) inner *= sizes[d];
  sizes[1] = L;
  at::Tensor out = at::empty(sizes, x.options());
  gather_planes(x.const_data_ptr<T>(), outer, planes, inner, in.live.data(), L, out.mutable_data_ptr<T>());
  return out;
}

// Whether every element of p[0:n) is finite (v - v is 0 for finite v, NaN for infinities and NaN).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += p[i] - p[i];
  return acc == T(0);
}

// dst[r, cols[l], :] = src[r, l, :] for r < rows, l < n_cols, and zero elsewhere in dst's rows: the
// inverse of gather_rows_cols on whole rows. src: [rows, n_cols, inner], dst: [rows, width, inner].
template <typename T>
void scatter_cols(const T* src, int64_t rows, int64_t n_cols, int64_t inner, const int64_t* cols, int64_t width,
                  T* dst) {
  at::parallel_for(0, rows, grain(width * inner), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* d = dst + r * width * inner;
      std::memset(d, 0, width * inner * sizeof(T));
      const T* s = src + r * n_cols * inner;
      for (int64_t l = 0; l < n_cols; ++l) std::memcpy(d + cols[l] * inner, s + l * inner, inner * sizeof(T));
    }
  });
}

// dst[j, l, :] = src[rows[j], cols[l], :] for j < n_rows, l < n_cols: rows of src [*, width, inner]
// (contiguous) restricted to some of their columns, as a contiguous [n_rows, n_cols, inner].
template <typename T>
void gather_rows_cols(const T* src, int64_t width, int64_t inner, const int64_t* rows, int64_t n_rows,
                      const int64_t* cols, int64_t n_cols, T* dst) {
  at::parallel_for(0, n_rows, grain(n_cols * inner), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* s = src + rows[j] * width * inner;
      T* d = dst + j * n_cols * inner;
      if (inner == 1) {
        for (int64_t l = 0; l < n_cols; ++l) d[l] = s[cols[l]];
      } else {
        for (int64_t l = 0; l < n_cols; ++l) std::memcpy(d + l * inner, s + cols[l] * inner, inner * sizeof(T));
      }
    }
  });
}

// ------------------------------------------------------------------------------ gradient rows

// The gradient epilogue (docs/DESIGN.md §2) of graded row i = rows.graded[p], whose dense weight gradient
// G_i is the row at `g` (fan_in elements):
//   dm_i = <G_i, W_i> + b_i * gsum_i                    (only where the gate is open)
//   dW_i = m_i * G_i + gate_i * dm_i * sign(W_i) / fan_in,  dtau_i = -gate_i * dm_i,
// dW_i written to its row of `dweight` (`g` may be that row). bias/gsum may be null (no bias).
template <typename T>
struct GradRows {
  const RowSets& rows;
  const T* weight;  // [N, fan_in]
  const T* bias;    // [N] or null
  const T* gsum;    // [N] dL/dy summed over batch (and space), or null without bias
  int64_t fan_in;
  T* dweight;     // [N, fan_in]
  T* dthreshold;  // [N], zero where the gate is closed

  void finish(int64_t p, const T* g) const { finish_row(rows.graded[p], g); }

  // Row i (graded) with G_i at `g`.
  void finish_row(int64_t i, const T* g) const {
    T* dst = dweight + i * fan_in;
    if (!rows.gate[i]) {  // graded with a closed gate: active, dW_i = G_i
      if (dst != g) std::memcpy(dst, g, fan_in * sizeof(T));
      return;
    }
    const T* w = weight + i * fan_in;
    T dm = dot(g, w, fan_in);
    if (bias) dm += bias[i] * gsum[i];
    dthreshold[i] = -dm;
    grad_row(dst, g, w, rows.mask[i] != 0, dm / static_cast<T>(std::max<int64_t>(fan_in, 1)), fan_in);
  }

  // Every row of a dweight holding the dense G of all N rows (masked dense): graded rows finished in
  // place, the others (pruned with a closed gate) zeroed.
  void finish_all_in_place() const {
    at::parallel_for(0, rows.n, warm_grain(fan_in), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* row = dweight + i * fan_in;
        if (rows.mask[i] || rows.gate[i]) {
          finish_row(i, row);
        } else {
          std::memset(row, 0, fan_in * sizeof(T));
        }
      }
    });
  }

  // Positions [p0, p1) with G in `compact` ([p1 - p0, fan_in]).
  void finish_compact(int64_t p0, int64_t p1, const T* compact) const {
    at::parallel_for(p0, p1, warm_grain(fan_in), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) finish(p, compact + (p - p0) * fan_in);
    });
  }

  // Positions [p0, p1) with G in the block of dweight rows [base, base + S), base = graded[p0],
  // S = p1 - p0 (a GEMM wrote it there: no buffer beside dW). Rows move up to their own rows, in
  // waves that never overwrite a G row not yet read; then block rows that are no graded row of the
  // positions, and `scratch_rows` more rows after the block (used as scratch), are zeroed.
  void finish_block(int64_t p0, int64_t p1, int64_t scratch_rows = 0) const {
    const int64_t* graded = rows.graded.data() + p0;
    const int64_t base = graded[0], size = p1 - p0;
    for (int64_t hi = size; hi > 0;) {
      // Rows at or past base + hi overwrite no unread block row [base, base + hi): those positions go
      // in parallel. None (lo == hi): graded[j] == base + j below hi, every G there is in place.
      const int64_t lo = std::lower_bound(graded, graded + hi, base + hi) - graded;
      const int64_t from = lo < hi ? lo : 0;
      at::parallel_for(from, hi, warm_grain(fan_in), [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) finish(p0 + j, dweight + (base + j) * fan_in);
      });
      hi = from;
    }
    const int64_t end = std::min(base + size + scratch_rows, rows.n);
    for (int64_t r = base, j = 0; r < end; ++r) {
      while (j < size && graded[j] < r) ++j;
      if (j == size || graded[j] != r) std::memset(dweight + r * fan_in, 0, fan_in * sizeof(T));
    }
  }
};

// The masked-dense epilogue: `dweight` [N, fan_in] holds the dense G of every row; finishes it in place
// (docs/DESIGN.md §2) and makes dthreshold [N] and, with a bias, dbias [N] (from dL/dy g [outer, N, inner]).
template <typename T>
void finish_masked_dense(const RowSets& rows, const at::Tensor& w, const std::optional<at::Tensor>& bias, const T* g,
                         int64_t outer, int64_t inner, at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dthreshold) {
  const int64_t n = rows.n, fan_in = w.numel() / std::max<int64_t>(n, 1);
  at::Tensor b;
  if (bias) {
    b = bias->contiguous();
    dbias = at::empty({n}, w.options());
    plane_sums(g, outer, n, inner, dbias.mutable_data_ptr<T>());
  }
  dthreshold = at::zeros({n}, w.options());
  const GradRows<T> grads{rows,
                          w.const_data_ptr<T>(),
                          b.defined() ? b.const_data_ptr<T>() : nullptr,
                          b.defined() ? dbias.const_data_ptr<T>() : nullptr,
                          fan_in,
                          dweight.mutable_data_ptr<T>(),
                          dthreshold.mutable_data_ptr<T>()};
  grads.finish_all_in_place();
  if (bias) rows.zero_pruned(dbias.mutable_data_ptr<T>());
}

}  // namespace spafl::cpu
