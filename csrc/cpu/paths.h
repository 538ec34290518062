// The choice table of the `cpp` backend (docs/DESIGN.md §5, "never slower than the layer it replaces"):
// where a call can run two exact ways (the row-skipping kernels or masked dense; oneDNN or im2col for a
// one-channel convolution's weight gradient), the first call of each signature times both and keeps the
// faster, and later calls of that signature reuse the choice. The table is exported and imported as text
// (ops spafl::paths_export / paths_import), so that spafl_kernels.paths can persist it per machine and a
// run can record it and replay it: a timed choice then never changes the numbers of a repeated run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

namespace spafl::cpu {

// A signature: its kind (ChoiceKind) first, then integers (shapes, dtype, thread count, flags, buckets).
using ChoiceKey = std::vector<int64_t>;

enum ChoiceKind : int64_t { kLinearFwd = 0, kLinearBwd = 1, kConvFwd = 2, kConvBwd = 3, kConvDw = 4 };

// Path choices (kinds 0-3): 0 = skip (rows skipped), 1 = dense (masked dense).
constexpr int64_t kPathSkip = 0, kPathDense = 1;

// The recorded choice of a signature, if any.
std::optional<int64_t> find_choice(const ChoiceKey& key);
// Records a choice unless the signature already has one (the first wins); returns the one kept.
int64_t record_choice(const ChoiceKey& key, int64_t choice);

// SPAFL_CPU_PATH: -1 (auto, unset or "auto"), kPathSkip ("skip") or kPathDense ("dense"); raises otherwise.
int64_t pinned_path();

// SPAFL_CPU_TIMED_CHOICE=first|second (a test and benchmark hook): the outcome every first-sight timing
// reports, instead of the clock's. -1 when unset.
int64_t forced_timing();

// Active rows as a bucket: 0 (none), 1-16 (sixteenths of N, rounded up), 17 (all).
inline int64_t row_bucket(int64_t count, int64_t n) {
  if (count <= 0) return 0;
  if (count >= n) return 17;
  return 1 + (count * 16 - 1) / n;
}

// A batch size (rows of a Linear's x, images of a Conv2d's) as a signature bucket: exact up to 16, else the
// next power of two, so that a run's last, smaller batches and its evaluation batches reuse its choices
// instead of timing afresh (the authors' FMNIST loop met 406 signatures in 5 rounds with exact sizes).
inline int64_t batch_bucket(int64_t m) {
  if (m <= 16) return m;
  int64_t b = 16;
  while (b < m) b *= 2;
  return b;
}

// Runs `first()` or `second()` (each returning the call's result), as `pinned` (0 or 1) says or else as
// the table says for `key`; on the signature's first sight, both kTimedRounds times (interleaved, so each
// also warms up), and the faster (its fastest run) is recorded and its result returned. Three rounds, not
// two: on a shared machine one descheduled run of each could pick a path twice as slow.
constexpr int kTimedRounds = 3;
template <typename First, typename Second>
auto choose(const ChoiceKey& key, int64_t pinned, First&& first, Second&& second) -> decltype(first()) {
  if (pinned == 0) return first();
  if (pinned == 1) return second();
  if (const std::optional<int64_t> found = find_choice(key)) return *found == 0 ? first() : second();
  using Clock = std::chrono::steady_clock;
  decltype(first()) results[2];
  double seconds[2] = {1e30, 1e30};
  for (int round = 0; round < kTimedRounds; ++round) {
    for (int which = 0; which < 2; ++which) {
      const auto start = Clock::now();
      results[which] = which == 0 ? first() : second();
      seconds[which] = std::min(seconds[which], std::chrono::duration<double>(Clock::now() - start).count());
    }
  }
  const int64_t forced = forced_timing();
  const int64_t faster = forced >= 0 ? forced : (seconds[1] < seconds[0] ? 1 : 0);
  return results[record_choice(key, faster)];
}

// The leading part of every path key: kind, dtype, thread count.
inline ChoiceKey key_head(ChoiceKind kind, const at::Tensor& weight) {
  return {kind, static_cast<int64_t>(weight.scalar_type()), static_cast<int64_t>(at::get_num_threads())};
}

}  // namespace spafl::cpu
