// Schemas of the C++ ops in the `spafl` namespace. Python (spafl_kernels/_ext.py) registers their
// fake kernels; each device's kernels register themselves with TORCH_LIBRARY_IMPL in their own file.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(spafl, m) {
  // Kernels of the `cpp` backend (csrc/cpu/linear.cpp, conv2d.cpp), float32/float64, CPU only. They
  // compute what spafl_kernels/backends/base.py specifies for linear_fwd/bwd and conv2d_fwd/bwd;
  // score is in the weight's dtype, and empty tensors stand for gradients not asked for.
  m.def("cpp_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold) -> (Tensor y, Tensor score)");
  m.def(
      "cpp_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, str ste, bool need_dx, "
      "bool need_params) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
  m.def(
      "cpp_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor threshold, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> (Tensor y, Tensor score)");
  m.def(
      "cpp_conv2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor score, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str ste, bool need_dx, bool need_params) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dthreshold)");
}

// Importing spafl_kernels._C runs the static registrations above; the module itself is empty.
static PyModuleDef spafl_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spafl_module); }
