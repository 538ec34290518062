// Sparse Conv2d (groups == 1, NCHW) as implicit-GEMM problems for gemm.cuh: im2col happens in the
// loaders, element by element, so no unfolded copy of x is ever materialised. The problem structs here
// and in linear.cuh are alike on purpose (gemm.cuh says why).
//
// GEMM views, with pixels m = (b, oh, ow) or (b, ih, iw) and filter columns j = (c, kh, kw):
//   forward  y[b, perm[p], oh, ow] = sum_j im2col(x)[(b, oh, ow), j] W[perm[p], j]
//   dx       dx[(b, ih, iw), c]    = sum_{(q, kh, kw)} grad_y[b, active[q], oh, ow] W[active[q], c, kh, kw]
//            where oh * stride = ih + pad - kh * dilation (taps that do not land on an output are 0)
//   dW       G[rows[p], j]         = sum_{(b, oh, ow)} grad_y[b, rows[p], oh, ow] im2col(x)[(b, oh, ow), j]
#pragma once

#include "gemm.cuh"

namespace spafl {

struct ConvGeom {
  SpaflConvShape s;
  int64_t out_pixels;  // out_h * out_w
  int64_t in_pixels;   // height * width
  int64_t taps;        // kernel_h * kernel_w
  int64_t fan_in;      // in_channels * taps: elements per filter

  static ConvGeom make(const SpaflConvShape& s) {
    return ConvGeom{s, s.out_h * s.out_w, s.height * s.width, s.kernel_h * s.kernel_w,
                    s.in_channels * s.kernel_h * s.kernel_w};
  }
  bool valid() const {
    return s.batch >= 0 && s.in_channels >= 0 && s.height >= 0 && s.width >= 0 && s.out_channels >= 0 &&
           s.kernel_h >= 1 && s.kernel_w >= 1 && s.out_h >= 0 && s.out_w >= 0 && s.stride_h >= 1 && s.stride_w >= 1 &&
           s.pad_h >= 0 && s.pad_w >= 0 && s.dilation_h >= 1 && s.dilation_w >= 1;
  }

  // im2col(x)[m, j] with m = (b, oh, ow) over batch * out_pixels and j = (c, kh, kw) over fan_in; 0 in the padding.
  template <class T>
  SPAFL_HD T im2col(const T* x, int64_t m, int64_t j) const {
    const int64_t b = m / out_pixels, r = m % out_pixels;
    const int64_t oh = r / s.out_w, ow = r % s.out_w;
    const int64_t c = j / taps, t = j % taps;
    const int64_t kh = t / s.kernel_w, kw = t % s.kernel_w;
    const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
    const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dilation_w;
    if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) return zero<T>();
    return x[((b * s.in_channels + c) * s.height + ih) * s.width + iw];
  }

  // Output pixel index (oh * out_w + ow) that input pixel (ih, iw) feeds through tap t = (kh, kw), or -1.
  SPAFL_HD int64_t output_pixel(int64_t ih, int64_t iw, int64_t t) const {
    const int64_t kh = t / s.kernel_w, kw = t % s.kernel_w;
    const int64_t sh = ih + s.pad_h - kh * s.dilation_h, sw = iw + s.pad_w - kw * s.dilation_w;
    if (sh < 0 || sw < 0 || sh % s.stride_h != 0 || sw % s.stride_w != 0) return -1;
    const int64_t oh = sh / s.stride_h, ow = sw / s.stride_w;
    if (oh >= s.out_h || ow >= s.out_w) return -1;
    return oh * s.out_w + ow;
  }
};

template <class T>
struct Conv2dFwd {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  // Consecutive m are neighbouring output pixels: im2col reads and y writes coalesce along m.
  static constexpr bool kAFastK = false, kBFastK = true, kCFastM = true;
  const T* x;
  const T* weight;
  const T* bias;  // may be null
  const int64_t* perm;
  const int64_t* count;
  T* y;
  ConvGeom g;

  int64_t m_bound() const { return g.s.batch * g.out_pixels; }
  int64_t n_bound() const { return g.s.out_channels; }
  SPAFL_HD int64_t m_extent() const { return g.s.batch * g.out_pixels; }
  SPAFL_HD int64_t n_extent() const { return g.s.out_channels; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t n0) const { return n0 < *count ? g.fan_in : 0; }
  SPAFL_HD T a(int64_t m, int64_t j) const { return g.im2col(x, m, j); }
  SPAFL_HD T b(int64_t j, int64_t p) const { return weight[perm[p] * g.fan_in + j]; }
  SPAFL_HD void store(int64_t m, int64_t p, Acc v) const {
    const int64_t n = perm[p];
    const int64_t b = m / g.out_pixels, r = m % g.out_pixels;
    Acc out = 0;  // pruned filters output exactly 0, bias included
    if (p < *count) out = v + (bias ? to_acc(bias[n]) : Acc(0));
    y[(b * g.s.out_channels + n) * g.out_pixels + r] = from_acc<T>(out);
  }
};

template <class T>
struct Conv2dDx {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  // Consecutive m are neighbouring input pixels (grad_y reads, dx writes); consecutive q walk a filter's taps.
  static constexpr bool kAFastK = false, kBFastK = true, kCFastM = true;
  const T* grad_y;
  const T* weight;
  const int64_t* active;
  const int64_t* count;
  T* dx;
  ConvGeom g;

  int64_t m_bound() const { return g.s.batch * g.in_pixels; }
  int64_t n_bound() const { return g.s.in_channels; }
  SPAFL_HD int64_t m_extent() const { return g.s.batch * g.in_pixels; }
  SPAFL_HD int64_t n_extent() const { return g.s.in_channels; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t) const { return *count * g.taps; }
  SPAFL_HD T a(int64_t m, int64_t q) const {
    const int64_t b = m / g.in_pixels, r = m % g.in_pixels;
    const int64_t pixel = g.output_pixel(r / g.s.width, r % g.s.width, q % g.taps);
    if (pixel < 0) return zero<T>();
    const int64_t n = active[q / g.taps];
    return grad_y[(b * g.s.out_channels + n) * g.out_pixels + pixel];
  }
  SPAFL_HD T b(int64_t q, int64_t c) const {
    const int64_t n = active[q / g.taps];
    return weight[(n * g.s.in_channels + c) * g.taps + q % g.taps];
  }
  SPAFL_HD void store(int64_t m, int64_t c, Acc v) const {
    const int64_t b = m / g.in_pixels, r = m % g.in_pixels;
    dx[(b * g.s.in_channels + c) * g.in_pixels + r] = from_acc<T>(v);
  }
};

template <class T>
struct Conv2dDw {
  using Elem = T;
  using Acc = typename Num<T>::Acc;
  // Reduction over output pixels: grad_y planes and im2col rows are contiguous along it.
  static constexpr bool kAFastK = true, kBFastK = true, kCFastM = false;
  const T* grad_y;
  const T* x;
  const int64_t* rows;
  const int64_t* count;
  T* dweight;
  ConvGeom g;

  int64_t m_bound() const { return g.s.out_channels; }
  int64_t n_bound() const { return g.fan_in; }
  SPAFL_HD int64_t m_extent() const { return *count; }
  SPAFL_HD int64_t n_extent() const { return g.fan_in; }
  SPAFL_HD int64_t k_extent(int64_t, int64_t) const { return g.s.batch * g.out_pixels; }
  SPAFL_HD T a(int64_t p, int64_t q) const {
    const int64_t b = q / g.out_pixels, r = q % g.out_pixels;
    return grad_y[(b * g.s.out_channels + rows[p]) * g.out_pixels + r];
  }
  SPAFL_HD T b(int64_t q, int64_t j) const { return g.im2col(x, q, j); }
  SPAFL_HD void store(int64_t p, int64_t j, Acc v) const { dweight[rows[p] * g.fan_in + j] = from_acc<T>(v); }
};

// Shared launcher logic for the device (conv2d.cu) and the host emulation: Exec provides gemm(P).

// Calls f(TypeTag<T>{}, geometry) after checking the shape (strides and dilations >= 1 divide below).
template <class F>
cudaError_t dispatch_conv2d(int dtype, const SpaflConvShape* shape, F&& f) {
  if (shape == nullptr) return cudaErrorInvalidValue;
  const ConvGeom g = ConvGeom::make(*shape);
  if (!g.valid()) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) { return f(tag, g); });
}

template <class Exec>
cudaError_t run_conv2d_fwd(const Exec& exec, int dtype, const void* x, const void* weight, const void* bias,
                           const int64_t* perm, const int64_t* count, void* y, const SpaflConvShape* shape) {
  return dispatch_conv2d(dtype, shape, [&](auto tag, const ConvGeom& g) {
    using T = typename decltype(tag)::type;
    return exec.gemm(Conv2dFwd<T>{static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                                  perm, count, static_cast<T*>(y), g});
  });
}

template <class Exec>
cudaError_t run_conv2d_dx(const Exec& exec, int dtype, const void* grad_y, const void* weight, const int64_t* active,
                          const int64_t* count, void* dx, const SpaflConvShape* shape) {
  return dispatch_conv2d(dtype, shape, [&](auto tag, const ConvGeom& g) {
    using T = typename decltype(tag)::type;
    return exec.gemm(Conv2dDx<T>{static_cast<const T*>(grad_y), static_cast<const T*>(weight), active, count,
                                 static_cast<T*>(dx), g});
  });
}

template <class Exec>
cudaError_t run_conv2d_dw(const Exec& exec, int dtype, const void* grad_y, const void* x, const int64_t* rows,
                          const int64_t* count, void* dweight, const SpaflConvShape* shape) {
  return dispatch_conv2d(dtype, shape, [&](auto tag, const ConvGeom& g) {
    using T = typename decltype(tag)::type;
    return exec.gemm(
        Conv2dDw<T>{static_cast<const T*>(grad_y), static_cast<const T*>(x), rows, count, static_cast<T*>(dweight), g});
  });
}

}  // namespace spafl
