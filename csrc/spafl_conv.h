// How a Conv2d slides its kernel, as the native conv ops take it (csrc/spafl.cpp): one `int[7] geometry`,
// [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups], the flat form of
// spafl_kernels.semantics.Conv2dGeometry. Parsed and checked here once for the CPU and the CUDA ops.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

namespace spafl {

struct ConvGeometry {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;

  // Output height (d = 0) or width (d = 1) for an input of `size` and a kernel of `kernel` along d.
  int64_t out_size(int d, int64_t size, int64_t kernel) const {
    return (size + 2 * padding[d] - dilation[d] * (kernel - 1) - 1) / stride[d] + 1;
  }
};

inline ConvGeometry conv_geometry(c10::IntArrayRef flat, const char* op) {
  TORCH_CHECK(flat.size() == 7, op,
              ": geometry must be [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups], got ", flat);
  const ConvGeometry g{{flat[0], flat[1]}, {flat[2], flat[3]}, {flat[4], flat[5]}, flat[6]};
  TORCH_CHECK(g.stride[0] >= 1 && g.stride[1] >= 1 && g.dilation[0] >= 1 && g.dilation[1] >= 1 && g.padding[0] >= 0 &&
                  g.padding[1] >= 0 && g.groups >= 1,
              op, ": stride, dilation and groups must be >= 1 and padding >= 0, got geometry ", flat);
  return g;
}

}  // namespace spafl
