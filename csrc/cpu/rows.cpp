// Row machinery of the CPU kernels; see rows.h.
#include "rows.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace spafl::cpu {

// ---------------------------------------------------------------------------- vector kernels
// Fixed-width lane arrays let the compiler keep several vector accumulators in flight (a single
// accumulator would wait on the add latency every step); each function is cloned per ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPAFL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPAFL_CLONES
#endif

namespace {

template <typename T>
constexpr int kLanes = 256 / sizeof(T);  // four 512-bit registers' worth

// Sums the lane array pairwise: vector adds, where a running scalar sum would wait on each add. Each
// halving has a compile-time width, so it is straight-line code: with a runtime width the compiler
// emits a loop that dominates abs_sum on short rows.
template <typename T, int Width = kLanes<T>>
inline T reduce_lanes(T* acc) {
  if constexpr (Width == 1) {
    return acc[0];
  } else {
    for (int l = 0; l < Width / 2; ++l) acc[l] += acc[l + Width / 2];
    return reduce_lanes<T, Width / 2>(acc);
  }
}

// The score's sum in the order semantics.row_score defines: lane l sums p[j] for j = l (mod kLanes), then
// reduce_lanes folds by halves; kLanes is semantics.score_lanes (64 floats, 32 doubles).
template <typename T>
inline T abs_sum_impl(const T* p, int64_t n) {
  T acc[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int l = 0; l < kLanes<T>; ++l) acc[l] += std::abs(p[j + l]);
  for (int l = 0; j + l < n; ++l) acc[l] += std::abs(p[j + l]);
  return reduce_lanes(acc);
}

template <typename T>
inline T dot_impl(const T* a, const T* b, int64_t n) {
  T acc[kLanes<T>] = {};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int l = 0; l < kLanes<T>; ++l) acc[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) acc[l] += a[j + l] * b[j + l];
  return reduce_lanes(acc);
}

template <typename T>
inline T sign(T w) {
  return static_cast<T>((w > T(0)) - (w < T(0)));
}

template <typename T>
inline void grad_row_impl(T* out, const T* g, const T* w, bool keep, T c, int64_t n) {
  if (keep) {
    for (int64_t j = 0; j < n; ++j) out[j] = g[j] + c * sign(w[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = c * sign(w[j]);
  }
}

}  // namespace

SPAFL_CLONES float abs_sum(const float* p, int64_t n) { return abs_sum_impl(p, n); }
SPAFL_CLONES double abs_sum(const double* p, int64_t n) { return abs_sum_impl(p, n); }
SPAFL_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
SPAFL_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }
SPAFL_CLONES void grad_row(float* out, const float* g, const float* w, bool keep, float c, int64_t n) {
  grad_row_impl(out, g, w, keep, c, n);
}
SPAFL_CLONES void grad_row(double* out, const double* g, const double* w, bool keep, double c, int64_t n) {
  grad_row_impl(out, g, w, keep, c, n);
}

// ---------------------------------------------------------------------------------- row sets

SpaflSte ste_from_code(int64_t code) {
  TORCH_CHECK(code == SPAFL_STE_IDENTITY || code == SPAFL_STE_OUTER || code == SPAFL_STE_CLIPPED,
              "ste must be 0 (identity), 1 (outer) or 2 (clipped), got ", code);
  return static_cast<SpaflSte>(code);
}

namespace {

float row_abs_sum(const float* p, int64_t n) { return abs_sum(p, n); }
double row_abs_sum(const double* p, int64_t n) { return abs_sum(p, n); }

}  // namespace

at::Tensor row_scores(const at::Tensor& weight, const at::Tensor& threshold) {
  const int64_t rows = weight.size(0);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == rows, "threshold must have shape (", rows, ",), got ",
              threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == weight.scalar_type(), "threshold dtype ", threshold.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
  const at::Tensor t = threshold.contiguous();
  const int64_t fan_in = rows ? weight.numel() / rows : 0;
  at::Tensor score = at::empty({rows}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spafl_row_scores", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* tau = t.const_data_ptr<scalar_t>();
    scalar_t* s = score.mutable_data_ptr<scalar_t>();
    // A division, not a multiply by a rounded 1/fan_in: semantics.row_score defines the score's bits.
    const scalar_t n = static_cast<scalar_t>(std::max<int64_t>(fan_in, 1));
    std::atomic<bool> finite{true};
    at::parallel_for(0, rows, grain(fan_in), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (!std::isfinite(tau[i])) finite.store(false, std::memory_order_relaxed);
        s[i] = row_abs_sum(w + i * fan_in, fan_in) / n - tau[i];
      }
    });
    // The check of sparse_linear/sparse_conv2d for the backends that do not make it (backends/base.py
    // Backend.checks_threshold), made here in the pass that reads the threshold anyway.
    TORCH_CHECK(finite, "spafl: threshold has non-finite values (nan or inf)");
  });
  return score;
}

std::vector<Segment> segments(const int64_t* idx, int64_t n, int64_t chunk, int64_t min_run) {
  std::vector<Segment> out;
  int64_t pending = 0;  // start of the gathered chunk being filled
  int64_t p = 0;
  while (p < n) {
    int64_t q = p + 1;
    while (q < n && idx[q] == idx[q - 1] + 1) ++q;
    if (q - p >= min_run || q - p == n) {
      if (pending < p) out.push_back({pending, p, false});
      out.push_back({p, q, true});
      pending = q;
    } else {
      while (q - pending >= chunk) {  // the gathered chunk is full
        out.push_back({pending, pending + chunk, false});
        pending += chunk;
      }
    }
    p = q;
  }
  if (pending < n) out.push_back({pending, n, false});
  return out;
}

int64_t panel_rows(int64_t fan_in, int64_t elem_size, int64_t total_rows) {
  constexpr int64_t kPanelBytes = int64_t(16) << 20;
  const int64_t rows = std::max<int64_t>(64, kPanelBytes / std::max<int64_t>(fan_in * elem_size, 1));
  return std::max<int64_t>(1, std::min(rows, total_rows));
}

// ---------------------------------------------------------------------------------- memory

namespace {

// SPAFL_CPU_HUGEPAGES=1 asks for transparent huge pages on these blocks. Off by default: on a VM whose
// host backs guest memory lazily, faulting in a cold huge page costs far more than reusing 4 KiB pages
// that are already backed; on warm memory huge pages cut the page faults of a large dW.
bool want_huge_pages() {
  static const bool on = [] {
    const char* value = std::getenv("SPAFL_CPU_HUGEPAGES");
    return value != nullptr && std::string(value) == "1";
  }();
  return on;
}

}  // namespace

at::Tensor fresh_pages(at::IntArrayRef sizes, const at::TensorOptions& options, bool zero) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  constexpr size_t kLarge = size_t(2) << 20;  // also the x86-64 huge page
  // Below it, reused heap memory.
  if (bytes < kLarge) return zero ? at::zeros(sizes, options) : at::empty(sizes, options);
#ifdef __linux__
  // Over-map by one huge page so that the block can start on a huge-page boundary.
  const size_t span = (bytes + kLarge - 1) / kLarge * kLarge;
  const size_t length = span + kLarge;
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base != MAP_FAILED) {
    void* data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(base) + kLarge - 1) / kLarge * kLarge);
    if (want_huge_pages()) madvise(data, span, MADV_HUGEPAGE);  // advice only
    return at::from_blob(data, sizes, [base, length](void*) { munmap(base, length); }, options);
  }
#endif
  void* data = std::calloc(bytes, 1);  // large calloc blocks are fresh zero pages too
  TORCH_CHECK(data != nullptr, "out of memory allocating ", bytes, " bytes");
  return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
}

void map_unwritten(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_POPULATE_READ)
  const size_t bytes = fresh.nbytes();
  if (bytes < (size_t(2) << 20)) return;  // not from fresh_pages' mapping
  constexpr uintptr_t kPage = 4096;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(fresh.const_data_ptr()) + kPage - 1) / kPage * kPage;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(fresh.const_data_ptr()) + bytes) / kPage * kPage;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ);  // advice only
#else
  (void)fresh;
#endif
}

}  // namespace spafl::cpu
