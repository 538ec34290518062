// Schemas of the spafl::cuda_* ops, the entry points of the `cuda` backend (spafl_kernels/backends/cuda).
// Always compiled, also against a CPU-only torch: the schemas then exist without a CUDA kernel, so their
// fake kernels (registered in Python) and shape logic work everywhere, and the backend tells "built without
// CUDA" from "not built" by asking whether the op has a CUDA kernel. The kernels: csrc/cuda/bindings.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(spafl, m) {
  // x [M, K], weight [N, K], bias [N]?, threshold [N] -> y [M, N], score [N] (float32 for 16-bit weights)
  m.def("cuda_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold) -> (Tensor y, Tensor score)");
  // ste: 0 identity, 1 outer, 2 clipped. Gradients not asked for are empty tensors (spafl::linear_bwd's rule).
  m.def(
      "cuda_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, int ste, bool need_dx, "
      "bool need_params) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
  // groups == 1; x [B, C, H, W], weight [N, C, kh, kw] -> y [B, N, H', W'], score [N]
  m.def(
      "cuda_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold, int[2] stride, int[2] padding, "
      "int[2] dilation) -> (Tensor y, Tensor score)");
  m.def(
      "cuda_conv2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, int[2] stride, "
      "int[2] padding, int[2] dilation, int ste, bool need_dx, bool need_params) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
}
