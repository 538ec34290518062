// Schemas of the native ops in the `spafl` namespace: the kernels of the `cpp` backend (csrc/cpu, the CPU
// implementation) and of the `cuda` backend (csrc/cuda/bindings.cpp, the CUDA implementation), one schema
// for both. They compute what spafl_kernels/backends/base.py's Kernels protocol specifies; `ste` is a
// SpaflSte code (spafl_ste.h), score is in the accumulation dtype (float32 for 16-bit weights), and empty
// tensors stand for gradients not asked for. Python (spafl_kernels/ops.py) registers their fake kernels.
// Always compiled, also against a CPU-only torch: the schemas then exist without a CUDA kernel, so the
// `cuda` backend tells "built without CUDA" from "not built" by asking whether the op has a CUDA kernel.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(spafl, m) {
  // x [M, K], weight [N, K], bias [N]?, threshold [N] -> y [M, N], score [N]
  m.def("native_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold) -> (Tensor y, Tensor score)");
  m.def(
      "native_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, int ste, bool need_dx, "
      "bool need_params) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
  // x [B, C, H, W], weight [N, C/groups, kh, kw] -> y [B, N, H', W'], score [N]
  // geometry: [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups] (spafl_conv.h)
  m.def(
      "native_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold, int[7] geometry) "
      "-> (Tensor y, Tensor score)");
  m.def(
      "native_conv2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, int[7] geometry, int ste, "
      "bool need_dx, bool need_params) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
  // The forward op and its backward as one C++ autograd node (csrc/autograd.cpp): the eager path of both
  // native backends, for the device of the tensors.
  m.def("native_linear(Tensor x, Tensor weight, Tensor? bias, Tensor threshold, int ste) -> Tensor y");
  m.def("native_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor threshold, int[7] geometry, int ste) -> Tensor y");
}

// What this binary was built against, as "SPAFL_BUILD_INFO=" + JSON: setup.py generates the header; the
// marker lets spafl_kernels/_ext.py find the string in the file when the module cannot even be loaded.
#if __has_include("spafl_build_info.h")
#include "spafl_build_info.h"
#else
#include <torch/version.h>
#define SPAFL_BUILD_INFO \
  "SPAFL_BUILD_INFO={\"torch\": \"" TORCH_VERSION "\", \"cuda\": null, \"cuda_kernels\": null, \"package\": null}"
#endif

// Importing spafl_kernels._C runs the static registrations above; the module carries only BUILD_INFO.
static PyModuleDef spafl_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&spafl_module);
  if (module != nullptr && PyModule_AddStringConstant(module, "BUILD_INFO", SPAFL_BUILD_INFO) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
