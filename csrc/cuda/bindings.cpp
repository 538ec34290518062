// CUDA implementations of the spafl::native_* ops (schemas: csrc/spafl.cpp): argument checks, output
// allocation, then the C launchers of spafl_cuda.h on the current stream. Compiled only against a CUDA build
// of torch (setup.py). Nothing here reads device memory or synchronises: row counts stay on the device, and
// the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers a toolkit may lack).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../spafl_conv.h"
#include "spafl_cuda.h"

namespace {

using at::Tensor;

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

int dtype_code(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat:
      return SPAFL_FLOAT32;
    case at::kDouble:
      return SPAFL_FLOAT64;
    case at::kHalf:
      return SPAFL_FLOAT16;
    case at::kBFloat16:
      return SPAFL_BFLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", type, " (float32, float64, float16 or bfloat16)");
  return -1;
}

void check_launch(cudaError_t status, const char* op, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, op, ": launching ", kernel, " failed: ", cudaGetErrorString(status));
}

// Same CUDA device and dtype as `like`.
void check_like(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but weight is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but weight has ",
              like.scalar_type());
}

void check_row_vector(const Tensor& t, int64_t rows, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (", rows, ",), got ", t.sizes());
}

Tensor contiguous_or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? t->contiguous() : Tensor(); }

// Checks of every op: weight on a CUDA device in a supported dtype, x and bias like it; returns the dtype code.
int check_layer(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got one on ", weight.device());
  const int dtype = dtype_code(weight.scalar_type(), op);
  check_like(x, weight, op, "x");
  if (bias.has_value()) {
    check_like(*bias, weight, op, "bias");
    check_row_vector(*bias, weight.size(0), op, "bias");
  }
  return dtype;
}

// A forward op's inputs, checked beyond their shapes (the caller's) and made contiguous.
struct FwdInputs {
  int dtype;
  Tensor x, weight, bias, threshold;  // bias: undefined when the layer has none
};

FwdInputs fwd_inputs(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                     const Tensor& threshold) {
  const int dtype = check_layer(op, x, weight, bias);
  check_like(threshold, weight, op, "threshold");
  check_row_vector(threshold, weight.size(0), op, "threshold");
  return {dtype, x.contiguous(), weight.contiguous(), contiguous_or_undefined(bias), threshold.contiguous()};
}

// The saved score: [rows] in the accumulation dtype, on weight's device.
void check_score(const Tensor& score, const Tensor& weight, const char* op) {
  TORCH_CHECK(score.device() == weight.device(), op, ": score is on ", score.device(), " but weight is on ",
              weight.device());
  TORCH_CHECK(score.scalar_type() == at::toOpMathType(weight.scalar_type()), op, ": score must have dtype ",
              at::toOpMathType(weight.scalar_type()), ", got ", score.scalar_type());
  check_row_vector(score, weight.size(0), op, "score");
}

const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mutable_data_or_null(const Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

// A backward op's inputs, checked beyond their shapes (grad_y's shape: the caller) and made contiguous.
struct BwdInputs {
  int dtype, ste;
  Tensor grad_y, x, weight, bias, score;  // bias: undefined when the layer has none
};

BwdInputs bwd_inputs(const char* op, const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                     const std::optional<Tensor>& bias, const Tensor& score, int64_t ste) {
  const int dtype = check_layer(op, x, weight, bias);
  check_like(grad_y, weight, op, "grad_y");
  check_score(score, weight, op);
  TORCH_CHECK(ste == SPAFL_STE_IDENTITY || ste == SPAFL_STE_OUTER || ste == SPAFL_STE_CLIPPED, op,
              ": ste must be 0 (identity), 1 (outer) or 2 (clipped), got ", ste);
  return {dtype,
          static_cast<int>(ste),
          grad_y.contiguous(),
          x.contiguous(),
          weight.contiguous(),
          contiguous_or_undefined(bias),
          score.contiguous()};
}

// score [rows] = mean|W_row| - tau, in the accumulation dtype. weight contiguous [rows, ...].
Tensor row_scores(const Tensor& weight, const Tensor& threshold, int dtype, cudaStream_t stream, const char* op) {
  const int64_t rows = weight.size(0);
  const int64_t fan_in = rows > 0 ? weight.numel() / rows : 0;
  Tensor score = at::empty({rows}, weight.options().dtype(at::toOpMathType(weight.scalar_type())));
  check_launch(spafl_cuda_row_scores(dtype, weight.const_data_ptr(), threshold.const_data_ptr(),
                                     score.mutable_data_ptr(), rows, fan_in, stream),
               op, "row_scores");
  return score;
}

// Selected rows first (ascending) in `index`, their number in the 0-d device tensor `count`.
struct RowSet {
  Tensor index;  // [rows] int64
  Tensor count;  // [] int64
};

RowSet select_rows(const Tensor& score, int dtype, int ste, bool complement, cudaStream_t stream, const char* op) {
  const int64_t rows = score.size(0);
  RowSet set{at::empty({rows}, score.options().dtype(at::kLong)), at::empty({}, score.options().dtype(at::kLong))};
  check_launch(
      spafl_cuda_select_rows(dtype, score.const_data_ptr(), rows, ste, complement ? 1 : 0,
                             set.index.mutable_data_ptr<int64_t>(), set.count.mutable_data_ptr<int64_t>(), stream),
      op, "select_rows");
  return set;
}

// dweight holds the dense weight gradient of the rows needing one; turns it into (dweight, dbias, dthreshold).
// dbias is undefined without a bias.
std::tuple<Tensor, Tensor> param_grads(const Tensor& score, int ste, const Tensor& weight, const Tensor& bias,
                                       const Tensor& grad_y, const Tensor& dweight, int64_t outer, int64_t inner,
                                       int dtype, cudaStream_t stream, const char* op) {
  const int64_t rows = weight.size(0);
  const Tensor dbias = bias.defined() ? at::empty({rows}, bias.options()) : Tensor();
  const Tensor dthreshold = at::empty({rows}, weight.options());
  check_launch(spafl_cuda_param_grads(dtype, score.const_data_ptr(), ste, weight.const_data_ptr(), data_or_null(bias),
                                      grad_y.const_data_ptr(), dweight.mutable_data_ptr(), mutable_data_or_null(dbias),
                                      dthreshold.mutable_data_ptr(), rows, rows > 0 ? weight.numel() / rows : 0, outer,
                                      inner, stream),
               op, "param_grads");
  return {dbias, dthreshold};
}

// ------------------------------------------------------------------------------------------ linear

std::tuple<Tensor, Tensor> linear_fwd(const Tensor& x_, const Tensor& weight_, const std::optional<Tensor>& bias_,
                                      const Tensor& threshold_) {
  const char* op = "spafl::native_linear_fwd";
  TORCH_CHECK(x_.dim() == 2 && weight_.dim() == 2 && x_.size(1) == weight_.size(1), op,
              ": expected x [M, K] and weight [N, K], got ", x_.sizes(), " and ", weight_.sizes());
  const auto [dtype, x, weight, bias, threshold] = fwd_inputs(op, x_, weight_, bias_, threshold_);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight);
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);

  Tensor score = row_scores(weight, threshold, dtype, stream, op);
  const RowSet perm = select_rows(score, dtype, SPAFL_SELECT_ACTIVE, true, stream, op);  // active, then pruned
  Tensor y = at::empty({M, N}, x.options());  // every element written: active columns and pruned zeros
  check_launch(spafl_cuda_linear_fwd(dtype, x.const_data_ptr(), weight.const_data_ptr(), data_or_null(bias),
                                     perm.index.const_data_ptr<int64_t>(), perm.count.const_data_ptr<int64_t>(),
                                     y.mutable_data_ptr(), M, N, K, stream),
               op, "linear_fwd");
  return {y, score};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_bwd(const Tensor& grad_y_, const Tensor& x_, const Tensor& weight_,
                                                      const std::optional<Tensor>& bias_, const Tensor& score_,
                                                      int64_t ste_, bool need_dx, bool need_params) {
  const char* op = "spafl::native_linear_bwd";
  TORCH_CHECK(x_.dim() == 2 && weight_.dim() == 2 && x_.size(1) == weight_.size(1), op,
              ": expected x [M, K] and weight [N, K], got ", x_.sizes(), " and ", weight_.sizes());
  TORCH_CHECK(grad_y_.dim() == 2 && grad_y_.size(0) == x_.size(0) && grad_y_.size(1) == weight_.size(0), op,
              ": grad_y must have shape (", x_.size(0), ", ", weight_.size(0), "), got ", grad_y_.sizes());
  const auto [dtype, ste, grad_y, x, weight, bias, scores] = bwd_inputs(op, grad_y_, x_, weight_, bias_, score_, ste_);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight);
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  // Each gradient not computed is its own empty tensor: the schema declares no aliasing between outputs.
  const auto none = [options = x.options()] { return at::empty({0}, options); };

  Tensor dx = none();
  if (need_dx) {
    const RowSet active = select_rows(scores, dtype, SPAFL_SELECT_ACTIVE, false, stream, op);
    dx = at::empty({M, K}, x.options());
    check_launch(spafl_cuda_linear_dx(dtype, grad_y.const_data_ptr(), weight.const_data_ptr(),
                                      active.index.const_data_ptr<int64_t>(), active.count.const_data_ptr<int64_t>(),
                                      dx.mutable_data_ptr(), M, N, K, stream),
                 op, "linear_dx");
  }
  if (!need_params) return {dx, none(), none(), none()};

  // Rows needing a weight gradient: active rows and pruned rows whose gate is open (for dL/dm).
  const RowSet graded = select_rows(scores, dtype, ste, false, stream, op);
  Tensor dweight = at::empty({N, K}, weight.options());
  check_launch(
      spafl_cuda_linear_dw(dtype, grad_y.const_data_ptr(), x.const_data_ptr(), graded.index.const_data_ptr<int64_t>(),
                           graded.count.const_data_ptr<int64_t>(), dweight.mutable_data_ptr(), M, N, K, stream),
      op, "linear_dw");
  auto [dbias, dthreshold] =
      param_grads(scores, ste, weight, bias, grad_y, dweight, /*outer=*/M, /*inner=*/1, dtype, stream, op);
  return {dx, dweight, dbias.defined() ? dbias : none(), dthreshold};
}

// ------------------------------------------------------------------------------------------ conv2d

// Shape of x [B, C, H, W] * weight [N, C, kh, kw] (groups == 1) under `geometry`, checked.
SpaflConvShape conv_shape(const Tensor& x, const Tensor& weight, at::IntArrayRef geometry, const char* op) {
  const spafl::ConvGeometry geo = spafl::conv_geometry(geometry, op);
  // Dispatch never sends groups > 1 here (the cuda backend declares supports_groups = False): this guards
  // direct calls of the op.
  TORCH_CHECK(geo.groups == 1, op, ": the CUDA kernels implement groups=1 only, got groups=", geo.groups);
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": expected x [B, C, H, W] and weight [N, C, kh, kw], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1), " channels but weight expects ", weight.size(1));
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op, ": empty kernel ", weight.sizes());
  SpaflConvShape s{};
  s.batch = x.size(0);
  s.in_channels = x.size(1);
  s.height = x.size(2);
  s.width = x.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);
  s.stride_h = geo.stride[0];
  s.stride_w = geo.stride[1];
  s.pad_h = geo.padding[0];
  s.pad_w = geo.padding[1];
  s.dilation_h = geo.dilation[0];
  s.dilation_w = geo.dilation[1];
  s.out_h = geo.out_size(0, s.height, s.kernel_h);
  s.out_w = geo.out_size(1, s.width, s.kernel_w);
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, op, ": the padded input ", x.sizes(), " is smaller than the dilated kernel ",
              weight.sizes());
  return s;
}

std::tuple<Tensor, Tensor> conv2d_fwd(const Tensor& x_, const Tensor& weight_, const std::optional<Tensor>& bias_,
                                      const Tensor& threshold_, at::IntArrayRef geometry) {
  const char* op = "spafl::native_conv2d_fwd";
  const SpaflConvShape s = conv_shape(x_, weight_, geometry, op);
  const auto [dtype, x, weight, bias, threshold] = fwd_inputs(op, x_, weight_, bias_, threshold_);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight);

  Tensor score = row_scores(weight, threshold, dtype, stream, op);
  const RowSet perm = select_rows(score, dtype, SPAFL_SELECT_ACTIVE, true, stream, op);  // active, then pruned
  // Every element of y is written: active channels and pruned zeros.
  Tensor y = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, x.options());
  check_launch(spafl_cuda_conv2d_fwd(dtype, x.const_data_ptr(), weight.const_data_ptr(), data_or_null(bias),
                                     perm.index.const_data_ptr<int64_t>(), perm.count.const_data_ptr<int64_t>(),
                                     y.mutable_data_ptr(), &s, stream),
               op, "conv2d_fwd");
  return {y, score};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_bwd(const Tensor& grad_y_, const Tensor& x_, const Tensor& weight_,
                                                      const std::optional<Tensor>& bias_, const Tensor& score_,
                                                      at::IntArrayRef geometry, int64_t ste_, bool need_dx,
                                                      bool need_params) {
  const char* op = "spafl::native_conv2d_bwd";
  const SpaflConvShape s = conv_shape(x_, weight_, geometry, op);
  TORCH_CHECK(grad_y_.dim() == 4 && grad_y_.size(0) == s.batch && grad_y_.size(1) == s.out_channels &&
                  grad_y_.size(2) == s.out_h && grad_y_.size(3) == s.out_w,
              op, ": grad_y must have shape (", s.batch, ", ", s.out_channels, ", ", s.out_h, ", ", s.out_w, "), got ",
              grad_y_.sizes());
  const auto [dtype, ste, grad_y, x, weight, bias, scores] = bwd_inputs(op, grad_y_, x_, weight_, bias_, score_, ste_);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight);
  const auto none = [options = x.options()] { return at::empty({0}, options); };  // one per gradient not computed

  Tensor dx = none();
  if (need_dx) {
    const RowSet active = select_rows(scores, dtype, SPAFL_SELECT_ACTIVE, false, stream, op);
    dx = at::empty({s.batch, s.in_channels, s.height, s.width}, x.options());
    check_launch(spafl_cuda_conv2d_dx(dtype, grad_y.const_data_ptr(), weight.const_data_ptr(),
                                      active.index.const_data_ptr<int64_t>(), active.count.const_data_ptr<int64_t>(),
                                      dx.mutable_data_ptr(), &s, stream),
                 op, "conv2d_dx");
  }
  if (!need_params) return {dx, none(), none(), none()};

  const RowSet graded = select_rows(scores, dtype, ste, false, stream, op);
  Tensor dweight = at::empty(weight.sizes(), weight.options());
  check_launch(
      spafl_cuda_conv2d_dw(dtype, grad_y.const_data_ptr(), x.const_data_ptr(), graded.index.const_data_ptr<int64_t>(),
                           graded.count.const_data_ptr<int64_t>(), dweight.mutable_data_ptr(), &s, stream),
      op, "conv2d_dw");
  auto [dbias, dthreshold] = param_grads(scores, ste, weight, bias, grad_y, dweight, /*outer=*/s.batch,
                                         /*inner=*/s.out_h * s.out_w, dtype, stream, op);
  return {dx, dweight, dbias.defined() ? dbias : none(), dthreshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(spafl, CUDA, m) {
  m.impl("native_linear_fwd", &linear_fwd);
  m.impl("native_linear_bwd", &linear_bwd);
  m.impl("native_conv2d_fwd", &conv2d_fwd);
  m.impl("native_conv2d_bwd", &conv2d_bwd);
}
