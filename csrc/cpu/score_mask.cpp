// CPU kernel of spafl::score_mask: one pass over the weight computes every row's score, then a
// prefix count over the mask writes the active indices in ascending order.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>

namespace {

template <typename scalar_t, typename acc_t>
void row_scores(const scalar_t* weight, const scalar_t* threshold, acc_t* score, int64_t rows,
                int64_t row_size) {
  at::parallel_for(0, rows, /*grain_size=*/std::max<int64_t>(1, 32768 / std::max<int64_t>(row_size, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const scalar_t* row = weight + i * row_size;
                       acc_t sum = 0;
                       for (int64_t j = 0; j < row_size; ++j) sum += std::abs(static_cast<acc_t>(row[j]));
                       score[i] = sum / static_cast<acc_t>(row_size) - static_cast<acc_t>(threshold[i]);
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_mask_cpu(const at::Tensor& weight,
                                                              const at::Tensor& threshold) {
  TORCH_CHECK(weight.dim() >= 1, "score_mask: weight must have at least 1 dimension");
  const int64_t rows = weight.size(0);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == rows, "score_mask: threshold must have shape (",
              rows, ",), got ", threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == weight.scalar_type(), "score_mask: threshold dtype ",
              threshold.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = threshold.contiguous();
  const int64_t row_size = rows ? w.numel() / rows : 0;
  const auto acc_type = at::toOpMathType(w.scalar_type());
  at::Tensor score = at::empty({rows}, w.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "score_mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_scores<scalar_t, acc_t>(w.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                score.mutable_data_ptr<acc_t>(), rows, row_size);
  });
  at::Tensor active = at::empty({rows}, w.options().dtype(at::kLong));
  int64_t* out = active.mutable_data_ptr<int64_t>();
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "score_mask_compact", [&] {
    const scalar_t* s = score.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i)
      if (s[i] > 0) out[count++] = i;
  });
  for (int64_t i = count; i < rows; ++i) out[i] = -1;
  return {score, active, at::scalar_tensor(count, w.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(spafl, CPU, m) { m.impl("score_mask", &score_mask_cpu); }
