// The eager path of the native backends (`cpp`, `cuda`): one sparse layer call is one C++ autograd node,
// so neither its forward nor its backward runs any Python: a Python autograd.Function cost
// more than a small dense layer. It computes exactly what spafl_kernels/ops.py's autograd formula does
// with the same native ops, called through the dispatcher so that one node serves the CPU and the CUDA
// kernels:
//
//   native_linear(x [M, K], weight [N, K], bias [N]?, threshold [N], ste) -> y [M, N]
//   native_conv2d(x [B, C, H, W], weight [N, C/groups, kh, kw], bias?, threshold, geometry, ste) -> y
//
// Python calls them in eager mode when no forward-mode AD or torch.func transform is active
// (ops.sparse_op); torch.compile traces the `spafl::linear_fwd`/`conv2d_fwd` custom ops instead (these
// ops trace too: CompositeImplicitAutograd, and opcheck passes). Like the Python formula, the gradients
// refuse a second derivative with a clear error instead of reading 0 (NoDoubleBackward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace spafl {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using YScore = std::tuple<Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The native ops through the dispatcher (csrc/spafl.cpp schemas); an empty geometry means Linear.
YScore native_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& threshold,
                  c10::IntArrayRef geometry) {
  if (geometry.empty()) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("spafl::native_linear_fwd", "")
            .typed<YScore(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&)>();
    return op.call(x, weight, bias, threshold);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spafl::native_conv2d_fwd", "")
          .typed<YScore(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, c10::IntArrayRef)>();
  return op.call(x, weight, bias, threshold, geometry);
}

Grads native_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                 const Tensor& score, c10::IntArrayRef geometry, int64_t ste, bool need_dx, bool need_params) {
  if (geometry.empty()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("spafl::native_linear_bwd", "")
                               .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                            const Tensor&, int64_t, bool, bool)>();
    return op.call(grad_y, x, weight, bias, score, ste, need_dx, need_params);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spafl::native_conv2d_bwd", "")
                             .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                          const Tensor&, c10::IntArrayRef, int64_t, bool, bool)>();
  return op.call(grad_y, x, weight, bias, score, geometry, ste, need_dx, need_params);
}

// Passes a backward pass's gradients through; differentiating them again raises. Their true inputs
// (grad_y and the saved tensors) come along as `deps`, so that the gradients require grad exactly when a
// second derivative could flow, and reach this backward instead of reading 0. ops.py's
// _NoDoubleBackward does the same for the Python path, in the same words.
struct NoDoubleBackward : torch::autograd::Function<NoDoubleBackward> {
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, at::TensorList deps, bool cuda) {
    ctx->saved_data["backend"] = std::string(cuda ? "cuda" : "cpp");
    variable_list out;
    out.reserve(grads.size());
    for (const Tensor& g : grads) out.push_back(g.view_as(g));
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "spafl: backend '", ctx->saved_data["backend"].toStringRef(),
                "' does not support double backward (create_graph=True, hessians, gradient penalties): its kernels "
                "give first derivatives through backward() only; backend='reference' (masked dense under plain "
                "autograd) gives higher derivatives");
  }
};

// The backward of one sparse layer call: a plain autograd Node (as ATen's generated backward nodes
// are), not a torch::autograd::Function, whose generic bookkeeping (input infos, saved-data map, output
// wrapping) costs more per call than a small layer's product. Saves x, weight, bias and score
// (nothing of y: in-place ops on y stay legal); SavedVariable raises if any of them is modified in
// place before backward. Edges: x, weight, bias (invalid without one), threshold.
struct SparseLayerBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x_, weight_, bias_, score_;
  std::vector<int64_t> geometry_;  // empty for a Linear
  int64_t ste_ = 0;
  bool has_bias_ = false;

  std::string name() const override { return "spafl::SparseLayerBackward"; }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
    score_.reset_data();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    const bool need_dx = task_should_compute_output(0), need_dweight = task_should_compute_output(1);
    const bool need_dbias = has_bias_ && task_should_compute_output(2), need_dthreshold = task_should_compute_output(3);
    variable_list input_grads(4);
    if (!need_dx && !need_dweight && !need_dbias && !need_dthreshold) return input_grads;
    const Tensor x = x_.unpack(), weight = weight_.unpack(), score = score_.unpack();
    const Tensor bias = has_bias_ ? bias_.unpack() : Tensor();
    // An undefined incoming gradient (a hook returned None) reads as zeros, as in a custom Function.
    const Tensor grad_y = grad_outputs[0].defined() ? grad_outputs[0].contiguous() : input_metadata(0).zeros_like();
    Grads grads;
    {
      // The kernels are not differentiable: under create_graph=True they run without autograd, and
      // NoDoubleBackward ties their results to what they depend on. Nor do they autocast (a backward
      // called inside torch.autocast): they compute in the forward's dtype (functional.py).
      at::AutoGradMode no_grad(false);
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      grads = native_bwd(grad_y, x, weight, has_bias_ ? std::optional<Tensor>(bias) : std::nullopt, score, geometry_,
                         ste_, need_dx, need_dweight || need_dbias || need_dthreshold);
    }
    auto [dx, dweight, dbias, dthreshold] = grads;
    input_grads = {need_dx ? dx : Tensor(), need_dweight ? dweight : Tensor(), need_dbias ? dbias : Tensor(),
                   need_dthreshold ? dthreshold : Tensor()};
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::vector<size_t> asked;
      variable_list to_pass;
      for (size_t i = 0; i < input_grads.size(); ++i) {
        if (input_grads[i].defined()) {
          asked.push_back(i);
          to_pass.push_back(input_grads[i]);
        }
      }
      variable_list deps = {grad_y, x, weight, score};
      if (has_bias_) deps.push_back(bias);
      const variable_list passed = NoDoubleBackward::apply(at::TensorList(to_pass), at::TensorList(deps), x.is_cuda());
      for (size_t j = 0; j < asked.size(); ++j) input_grads[asked[j]] = passed[j];
    }
    return input_grads;
  }
};

// One sparse layer call: the forward op below autograd, then (when a gradient can flow) its backward node.
Tensor sparse_layer(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& threshold,
                    c10::IntArrayRef geometry, int64_t ste) {
  YScore out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as in backward
    out = native_fwd(x, weight, bias, threshold, geometry);
  }
  const auto& [y, score] = out;
  const Tensor b = bias.value_or(Tensor());
  if (torch::autograd::compute_requires_grad(x, weight, b, threshold)) {
    auto node = c10::make_intrusive<SparseLayerBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, b, threshold));
    node->x_ = torch::autograd::SavedVariable(x, /*is_output=*/false);
    node->weight_ = torch::autograd::SavedVariable(weight, false);
    node->bias_ = torch::autograd::SavedVariable(b, false);
    node->score_ = torch::autograd::SavedVariable(score, false);
    node->geometry_ = geometry.vec();
    node->ste_ = ste;
    node->has_bias_ = b.defined();
    torch::autograd::set_history(y, node);
  }
  return y;
}

Tensor native_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& threshold,
                     int64_t ste) {
  return sparse_layer(x, weight, bias, threshold, c10::IntArrayRef(), ste);
}

Tensor native_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& threshold,
                     c10::IntArrayRef geometry, int64_t ste) {
  return sparse_layer(x, weight, bias, threshold, geometry, ste);
}

}  // namespace
}  // namespace spafl

TORCH_LIBRARY_IMPL(spafl, CompositeImplicitAutograd, m) {
  m.impl("native_linear", &spafl::native_linear);
  m.impl("native_conv2d", &spafl::native_conv2d);
}
