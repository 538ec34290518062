// Pieces shared by every CUDA kernel of spafl: element types, their accumulation types, dtype dispatch.
//
// Index arithmetic is int64 throughout: products such as row * fan_in or ((b * C + c) * H + h) * W
// overflow 32 bits on large layers. Everything marked SPAFL_HD also runs on the host, where
// tests/cuda_emulation.cpp executes the kernels' per-thread phases to check their index math without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "spafl_cuda.h"

#define SPAFL_HD __host__ __device__ __forceinline__

namespace spafl {

// Element type T and its accumulation type Acc (semantics.acc_dtype): float for the 16-bit types.
// Conversions are explicit: torch compiles extensions with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <class T>
struct Num;

template <>
struct Num<float> {
  using Acc = float;
  static SPAFL_HD float to_acc(float v) { return v; }
  static SPAFL_HD float from_acc(float v) { return v; }
};

template <>
struct Num<double> {
  using Acc = double;
  static SPAFL_HD double to_acc(double v) { return v; }
  static SPAFL_HD double from_acc(double v) { return v; }
};

template <>
struct Num<__half> {
  using Acc = float;
  static SPAFL_HD float to_acc(__half v) { return __half2float(v); }
  static SPAFL_HD __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static SPAFL_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static SPAFL_HD __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

template <class T>
SPAFL_HD typename Num<T>::Acc to_acc(T v) {
  return Num<T>::to_acc(v);
}

template <class T>
SPAFL_HD T from_acc(typename Num<T>::Acc v) {
  return Num<T>::from_acc(v);
}

template <class T>
SPAFL_HD T zero() {
  return Num<T>::from_acc(0);
}

template <class A>
SPAFL_HD A abs_value(A v) {
  return v < A(0) ? -v : v;
}

// torch.sign: -1, 0 or +1 (0 for 0).
template <class A>
SPAFL_HD A sign_of(A v) {
  return A((v > A(0)) - (v < A(0)));
}

SPAFL_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the element type named by a SpaflDtype code.
template <class F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case SPAFL_FLOAT32:
      return f(TypeTag<float>{});
    case SPAFL_FLOAT64:
      return f(TypeTag<double>{});
    case SPAFL_FLOAT16:
      return f(TypeTag<__half>{});
    case SPAFL_BFLOAT16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// STE gate of semantics.ste_gate as a bool; SPAFL_SELECT_ACTIVE (no STE) never opens.
template <class A>
SPAFL_HD bool gate_open(A score, int ste) {
  switch (ste) {
    case SPAFL_STE_IDENTITY:
      return true;
    case SPAFL_STE_OUTER:
      return !(abs_value(score) <= A(1));  // negated: a NaN score has its gate open (semantics.is_active)
    case SPAFL_STE_CLIPPED:
      return !(abs_value(score) > A(1));
    default:
      return false;
  }
}

}  // namespace spafl
