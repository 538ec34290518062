// CPU kernel of spafl::score_mask: one pass over the weight computes every row's score, then a
// prefix count over the mask writes the active indices in ascending order.
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "rows.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_mask_cpu(const at::Tensor& weight,
                                                              const at::Tensor& threshold) {
  TORCH_CHECK(weight.dim() >= 1, "score_mask: weight must have at least 1 dimension");
  const at::Tensor score = spafl::cpu::row_scores(weight.contiguous(), threshold);
  const int64_t rows = score.size(0);
  at::Tensor active = at::empty({rows}, weight.options().dtype(at::kLong));
  int64_t* out = active.mutable_data_ptr<int64_t>();
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(score.scalar_type(), "score_mask_compact", [&] {
    const scalar_t* s = score.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i)
      if (!(s[i] <= 0)) out[count++] = i;
  });
  for (int64_t i = count; i < rows; ++i) out[i] = -1;
  return {score, active, at::scalar_tensor(count, weight.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(spafl, CPU, m) { m.impl("score_mask", &score_mask_cpu); }
