// CPU kernels of the `cpp` backend's sparse Conv2d (docs/DESIGN.md §2): y = conv2d(x, m * W) + m * b.
//
// The convolutions run through ATen (oneDNN) on the active filters only (graded filters for dW);
// the filter panels are small, so they are gathered, and the work around the convolutions is on
// activations: y lives on fresh zero pages and its pruned planes are never touched, and only the active
// planes of dL/dy are gathered for the backward convolutions. With groups > 1 each group that has
// rows in the set is convolved on its own. At density 1 the ops are the dense ones plus the score pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../spafl_conv.h"
#include "paths.h"
#include "rows.h"

namespace spafl::cpu {
namespace {

using at::IntArrayRef;
using at::Tensor;

using Geometry = spafl::ConvGeometry;

void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                  const Geometry& geo) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the cpp backend supports float32 and float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && x.dim() == 4, op, ": expected x [B, C, H, W] and weight [N, C/groups, kh, kw], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(0) % geo.groups == 0 && x.size(1) == weight.size(1) * geo.groups, op,
              ": channels do not match groups=", geo.groups);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", x.scalar_type(), " differs from weight's");
  TORCH_CHECK(
      !bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type()), op,
      ": bias must be [N] in the weight's dtype");
}

// Positions [begin, end) of idx (ascending row indices) that fall in each group of `per` rows.
struct GroupPart {
  int64_t group, begin, end;
};

std::vector<GroupPart> group_parts(const std::vector<int64_t>& idx, int64_t per) {
  std::vector<GroupPart> parts;
  const int64_t n = static_cast<int64_t>(idx.size());
  for (int64_t p = 0; p < n;) {
    const int64_t group = idx[p] / per;
    int64_t q = p;
    while (q < n && idx[q] / per == group) ++q;
    parts.push_back({group, p, q});
    p = q;
  }
  return parts;
}

// The input channels group `part.group` reads (all of x when groups == 1).
Tensor group_input(const Tensor& x, const Geometry& geo, const GroupPart& part) {
  if (geo.groups == 1) return x;
  const int64_t in_per = x.size(1) / geo.groups;
  return x.narrow(1, part.group * in_per, in_per);
}

// Rows idx[begin:end) of weight [N, ...] as a compact tensor (a view when they are consecutive).
template <typename T>
Tensor take_rows(const Tensor& weight, const std::vector<int64_t>& idx, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  if (idx[end - 1] - idx[begin] == n - 1) return weight.narrow(0, idx[begin], n);
  std::vector<int64_t> sizes = weight.sizes().vec();
  sizes[0] = n;
  Tensor out = at::empty(sizes, weight.options());
  gather_planes(weight.const_data_ptr<T>(), 1, weight.size(0), weight.numel() / weight.size(0), idx.data() + begin, n,
                out.mutable_data_ptr<T>());
  return out;
}

// Planes idx[begin:end) of images [b0, b1) of t [B, N, H, W], as a compact [b1 - b0, n, H, W] tensor.
template <typename T>
Tensor take_planes(const Tensor& t, const std::vector<int64_t>& idx, int64_t begin, int64_t end, int64_t b0,
                   int64_t b1) {
  const int64_t n = end - begin, planes = t.size(1), inner = t.size(2) * t.size(3);
  Tensor out = at::empty({b1 - b0, n, t.size(2), t.size(3)}, t.options());
  gather_planes(t.const_data_ptr<T>() + b0 * planes * inner, b1 - b0, planes, inner, idx.data() + begin, n,
                out.mutable_data_ptr<T>());
  return out;
}

// The weight gradient of a convolution of x [B, 1, H, W] (one input channel, groups == 1) with
// w [n, 1, kh, kw] by oneDNN (as PyTorch) or by im2col and a batched GEMM: dW[n, tap] = sum over images b
// and positions l of dL/dy[b, n, l] * cols[b, tap, l]. Which is faster depends on the CPU (on LeNet-5's
// conv1 either has won by 2-3x on different machines). So each shape is timed both ways on its first call and
// the faster kept, unless SPAFL_CPU_CONV_DW=onednn or =im2col (read on every call, so that a benchmark
// can interleave them) pins one. The column matrix [B, kh*kw, H'W'] is kh*kw/n times the size of dL/dy
// (g); im2col is a candidate only while it stays within twice g, or 8 MiB.
enum class DwAlgo { kOneDnn, kIm2col };

Tensor dw_by(DwAlgo algo, const Tensor& g, const Tensor& x, const Tensor& w, const Geometry& geo) {
  if (algo == DwAlgo::kOneDnn) {
    return std::get<1>(at::convolution_backward(g, x, w, std::nullopt, geo.stride, geo.padding, geo.dilation, false,
                                                {0, 0}, 1, {false, true, false}));
  }
  const Tensor cols = at::im2col(x, {w.size(2), w.size(3)}, geo.dilation, geo.padding, geo.stride);
  return at::bmm(g.reshape({g.size(0), g.size(1), -1}), cols.transpose(1, 2)).sum(0).view(w.sizes());
}

// The faster algorithm for this shape (and thread count), timed on first sight (the choice table,
// paths.h: recorded, so that a run replays it); both give dW.
Tensor single_channel_dw(const Tensor& g, const Tensor& x, const Tensor& w, const Geometry& geo) {
  const char* pin = std::getenv("SPAFL_CPU_CONV_DW");
  int64_t pinned = -1;
  if (pin != nullptr && std::string(pin) == "onednn") pinned = 0;
  if (pin != nullptr && std::string(pin) == "im2col") pinned = 1;
  ChoiceKey key = key_head(kConvDw, w);
  key.insert(key.end(), {batch_bucket(x.size(0)), x.size(2), x.size(3)});
  key.insert(key.end(), w.sizes().begin(), w.sizes().end());
  for (int d = 0; d < 2; ++d) key.insert(key.end(), {geo.stride[d], geo.padding[d], geo.dilation[d]});
  return choose(
      key, pinned, [&] { return dw_by(DwAlgo::kOneDnn, g, x, w, geo); },
      [&] { return dw_by(DwAlgo::kIm2col, g, x, w, geo); });
}

bool single_channel_candidate(const Tensor& g, const Tensor& x, const Tensor& w, int64_t groups) {
  if (groups != 1 || x.size(1) != 1) return false;
  const int64_t n = w.size(0), taps = w.size(2) * w.size(3);
  const int64_t g_bytes = g.numel() * g.element_size(), cols_bytes = g_bytes / std::max<int64_t>(n, 1) * taps;
  return cols_bytes <= std::max<int64_t>(2 * g_bytes, int64_t(8) << 20);
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Geometry& geo,
                                                 int64_t groups, bool want_dx, bool want_dw) {
  if (want_dw && single_channel_candidate(g, x, w, groups)) {
    Tensor dx;
    if (want_dx) {
      dx = std::get<0>(at::convolution_backward(g, x, w, std::nullopt, geo.stride, geo.padding, geo.dilation, false,
                                                {0, 0}, 1, {true, false, false}));
    }
    return {dx, single_channel_dw(g, x, w, geo), Tensor()};
  }
  return at::convolution_backward(g, x, w, std::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0}, groups,
                                  {want_dx, want_dw, false});
}

// Backward of the convolution of xg [B, Cg, H, W] with the filters idx[begin:end) of one group:
// (dx of xg, or undefined; the filters' dense weight gradient [n, Cg, kh, kw], or undefined). Their
// planes of g [B, N, H', W'] are gathered for oneDNN in batch chunks of at most half of g's size, so
// that the copy plus oneDNN's own reorder of it never outgrow the dense backward's reorder of all of g.
template <typename T>
std::pair<Tensor, Tensor> planes_backward(const Tensor& g, const Tensor& xg, const Tensor& w,
                                          const std::vector<int64_t>& idx, int64_t begin, int64_t end,
                                          const Geometry& geo, bool want_dx, bool want_dw) {
  const Tensor filters = take_rows<T>(w, idx, begin, end);
  const int64_t batch = g.size(0), n = end - begin;
  // Images per chunk: measured on conv-large at density 0.95, one chunk took the backward's peak to
  // 95 MiB over dense's 64; chunks of half of g took it to 63.
  const int64_t chunk = std::max<int64_t>(1, batch * g.size(1) / (2 * n));
  if (chunk >= batch) {
    auto [dx, dw, unused] =
        conv_backward(take_planes<T>(g, idx, begin, end, 0, batch), xg, filters, geo, 1, want_dx, want_dw);
    return {dx, dw};
  }
  Tensor dx = want_dx ? at::empty(xg.sizes(), xg.options()) : Tensor(), dw;
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t b1 = std::min(batch, b0 + chunk);
    auto [dx_part, dw_part, unused] = conv_backward(take_planes<T>(g, idx, begin, end, b0, b1),
                                                    xg.narrow(0, b0, b1 - b0), filters, geo, 1, want_dx, want_dw);
    if (want_dx) dx.narrow(0, b0, b1 - b0).copy_(dx_part);
    if (want_dw) dw = dw.defined() ? dw.add_(dw_part) : dw_part;
  }
  return {dx, dw};
}

// The row-skipping forward: the convolution of the active filters (on x's live channels), scattered
// into a zeroed y.
template <typename scalar_t>
Tensor conv2d_fwd_skip(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& score,
                       const RowSets& rows, const Geometry& geo) {
  const int64_t N = w.size(0), groups = geo.groups;
  Tensor y;
  const int64_t A = rows.num_active(), C = x.size(1), taps = w.size(2) * w.size(3);
  const LiveInputs in = groups == 1 && A ? live_inputs<scalar_t>(x, x.size(0), C, x.size(2) * x.size(3),
                                                                 score.const_data_ptr<scalar_t>(), rows.active)
                                         : LiveInputs{};
  if (A == N && !in.skip) {  // density 1: exactly the dense op
    y = at::convolution(x, w, bias, geo.stride, geo.padding, geo.dilation, false, {0, 0}, groups);
    return y;
  }
  std::vector<int64_t> out_sizes{x.size(0), N, 0, 0};
  for (int d = 0; d < 2; ++d) {
    out_sizes[2 + d] = geo.out_size(d, x.size(2 + d), w.size(2 + d));
  }
  // Reused heap memory (the layer after reads every plane: faulting in fresh pages costs more than writing
  // them), each element written once: the active planes by the scatters below, the pruned ones zeroed here.
  y = at::empty(out_sizes, x.options());
  zero_pruned_planes(y.mutable_data_ptr<scalar_t>(), out_sizes[0], rows, out_sizes[2] * out_sizes[3]);
  const Tensor b = bias ? bias->contiguous() : Tensor();
  const int64_t plane = out_sizes[2] * out_sizes[3];
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  if (in.skip) {
    // groups == 1: one convolution of x's live channels with those channels of the active filters.
    const int64_t L = static_cast<int64_t>(in.live.size());
    Tensor z;
    if (L == 0) {
      z = at::zeros({out_sizes[0], A, out_sizes[2], out_sizes[3]}, x.options());
    } else {
      const Tensor xs = gather_live<scalar_t>(x, in);
      Tensor filters = at::empty({A, L, w.size(2), w.size(3)}, w.options());
      gather_rows_cols(w.const_data_ptr<scalar_t>(), C, taps, rows.active.data(), A, in.live.data(), L,
                       filters.mutable_data_ptr<scalar_t>());
      z = at::convolution(xs, filters, std::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0}, 1)
              .contiguous();
    }
    scatter_planes(z.const_data_ptr<scalar_t>(), out_sizes[0], A, plane, rows.active.data(), N, bp,
                   y.mutable_data_ptr<scalar_t>());
  }
  for (const GroupPart& part : in.skip ? std::vector<GroupPart>{} : group_parts(rows.active, N / groups)) {
    const Tensor z =
        at::convolution(group_input(x, geo, part), take_rows<scalar_t>(w, rows.active, part.begin, part.end),
                        std::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0}, 1)
            .contiguous();
    scatter_planes(z.const_data_ptr<scalar_t>(), out_sizes[0], part.end - part.begin, plane,
                   rows.active.data() + part.begin, N, bp, y.mutable_data_ptr<scalar_t>());
  }
  return y;
}

// The masked-dense forward: the dense convolution, then the pruned filters' planes zeroed.
template <typename scalar_t>
Tensor conv2d_fwd_dense(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const RowSets& rows,
                        const Geometry& geo) {
  Tensor y = at::convolution(x, w, bias, geo.stride, geo.padding, geo.dilation, false, {0, 0}, geo.groups);
  if (rows.num_active() < rows.n) {
    y = y.contiguous();
    zero_pruned_planes(y.mutable_data_ptr<scalar_t>(), y.size(0), rows, y.size(2) * y.size(3));
  }
  return y;
}

// x [B, C, H, W], weight [N, C/groups, kh, kw], bias [N]?, threshold [N] -> (y [B, N, H', W'], score [N]).
// Skipping or masked dense, whichever the choice table (paths.h) says for the call's signature.
std::tuple<Tensor, Tensor> conv2d_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& threshold, IntArrayRef geometry) {
  const char* op = "spafl::native_conv2d_fwd";
  const Geometry geo = conv_geometry(geometry, op);
  check_inputs(op, x, weight, bias, geo);
  const Tensor w = weight.contiguous();
  const int64_t N = w.size(0);
  Tensor score = row_scores(w, threshold);
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spafl_cpp_conv2d_fwd", [&] {
    const RowSets rows(score.const_data_ptr<scalar_t>(), N, SPAFL_STE_IDENTITY, /*with_gates=*/false);
    ChoiceKey key = key_head(kConvFwd, w);
    key.insert(key.end(), {batch_bucket(x.size(0)), x.size(1), x.size(2), x.size(3)});
    key.insert(key.end(), w.sizes().begin(), w.sizes().end());
    key.insert(key.end(), geometry.begin(), geometry.end());
    key.insert(key.end(), {bias.has_value(), row_bucket(rows.num_active(), N)});
    y = choose(
        key, pinned_path(), [&] { return conv2d_fwd_skip<scalar_t>(x, w, bias, score, rows, geo); },
        [&] { return conv2d_fwd_dense<scalar_t>(x, w, bias, rows, geo); });
  });
  return {y, score};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The row-skipping backward: convolutions over the active (dx) and graded (dW) filters only. g, w, s
// contiguous.
template <typename scalar_t>
Grads conv2d_bwd_skip(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                      const Tensor& s, RowSets rows, const Geometry& geo, bool need_dx, bool need_params) {
  const int64_t N = w.size(0), fan_in = w.numel() / std::max<int64_t>(N, 1), groups = geo.groups;
  // Distinct empty tensors where a gradient is not asked for: op outputs must not alias each other.
  Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()), dbias = at::empty({0}, x.options()),
         dthreshold = at::empty({0}, x.options());
  if (need_params) rows.drop_silent(g.const_data_ptr<scalar_t>(), g.size(0), g.size(2) * g.size(3));
  const int64_t A = rows.num_active(), R = rows.num_graded(), per = N / groups, C = x.size(1);
  // Input channels that are zero over the batch add nothing to G: dW's product then reads x's live
  // channels only, unless dL/dy holds a NaN or infinity (times a zero input: NaN in G, as in dense). Found
  // again, not saved by the forward: the op saves nothing but its inputs and the score.
  LiveInputs in;
  if (need_params && groups == 1 && R > 0) {
    in = live_inputs<scalar_t>(x, x.size(0), C, x.size(2) * x.size(3), s.const_data_ptr<scalar_t>(), rows.active);
    if (in.skip && !all_finite(g.const_data_ptr<scalar_t>(), g.numel())) in = LiveInputs{};
  }
  // dbias holds gsum (dL/dy summed over batch and space) until the rows are finished, then is
  // masked: dL/db_i = m_i * gsum_i.
  Tensor b;
  if (need_params) {
    if (bias) {
      b = bias->contiguous();
      dbias = at::empty({N}, w.options());
      plane_sums(g.const_data_ptr<scalar_t>(), g.size(0), N, g.size(2) * g.size(3), dbias.mutable_data_ptr<scalar_t>());
    }
    dthreshold = at::empty({N}, w.options());
    std::fill_n(dthreshold.mutable_data_ptr<scalar_t>(), N, scalar_t(0));
  }
  // dW rows and dtau of graded positions [p0, p1), from their compact dense gradient, or in place.
  auto finish = [&](int64_t p0, int64_t p1, const Tensor& compact) {
    const GradRows<scalar_t> grads{rows,
                                   w.const_data_ptr<scalar_t>(),
                                   b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                   b.defined() ? dbias.const_data_ptr<scalar_t>() : nullptr,
                                   fan_in,
                                   dweight.mutable_data_ptr<scalar_t>(),
                                   dthreshold.mutable_data_ptr<scalar_t>()};
    if (compact.defined()) {
      grads.finish_compact(p0, p1, compact.const_data_ptr<scalar_t>());
    } else {
      grads.finish_block(p0, p1);
    }
  };
  const bool all_graded = need_params && R == N && !in.skip;
  bool dweight_done = false;
  if (need_dx && A == N) {  // density 1: the dense backward (dW too when every row is graded)
    Tensor dweight_full;
    std::tie(dx, dweight_full, std::ignore) = conv_backward(g, x, w, geo, groups, true, all_graded);
    if (all_graded) {
      dweight = dweight_full.contiguous();
      finish(0, N, Tensor());
      dweight_done = true;
    }
  } else if (need_dx && A == 0) {
    dx = at::zeros_like(x);
  } else if (need_dx) {
    // When no pruned row has an open gate, graded == active and dW's rows come with dx.
    const bool joint = need_params && rows.graded == rows.active && !in.skip;
    if (groups > 1) dx = at::zeros_like(x);
    for (const GroupPart& part : group_parts(rows.active, per)) {
      const Tensor xg = group_input(x, geo, part);
      auto [dx_part, dweight_part] =
          planes_backward<scalar_t>(g, xg, w, rows.active, part.begin, part.end, geo, true, joint);
      if (groups == 1) {
        dx = dx_part;
      } else {
        dx.narrow(1, xg.size(1) * part.group, xg.size(1)).copy_(dx_part);
      }
      if (joint) {
        // Allocated after the convolution: not alive beside oneDNN's buffers at its peak.
        if (!dweight.numel()) dweight = fresh_pages(w.sizes(), w.options(), /*zero=*/true);
        finish(part.begin, part.end, dweight_part.contiguous());
      }
    }
    dweight_done = joint;
  }
  if (need_params && !dweight_done && in.skip) {
    // groups == 1. The weight gradient of the graded rows on the live channels, [R, L, kh, kw], spread
    // into [R, C, kh, kw] with zeros on the dead channels. The filters passed give the shape only: a
    // backward for dW alone reads x and dL/dy, not the weight.
    const int64_t L = static_cast<int64_t>(in.live.size()), taps = w.size(2) * w.size(3);
    Tensor compact = at::empty({R, C, w.size(2), w.size(3)}, w.options());
    Tensor live_dw;  // [R, L, kh, kw]
    if (L > 0) {
      const Tensor xs = gather_live<scalar_t>(x, in);
      const Tensor shape_only = at::zeros({N, L, w.size(2), w.size(3)}, w.options());
      live_dw = (R == N ? std::get<1>(conv_backward(g, xs, shape_only, geo, 1, false, true))
                        : planes_backward<scalar_t>(g, xs, shape_only, rows.graded, 0, R, geo, false, true).second)
                    .contiguous();
    }
    scatter_cols(L > 0 ? live_dw.const_data_ptr<scalar_t>() : nullptr, R, L, taps, in.live.data(), C,
                 compact.mutable_data_ptr<scalar_t>());
    dweight = fresh_pages(w.sizes(), w.options(), /*zero=*/true);
    finish(0, R, compact);
  } else if (need_params && !dweight_done && R == N) {
    dweight = std::get<1>(conv_backward(g, x, w, geo, groups, false, true)).contiguous();
    finish(0, N, Tensor());
  } else if (need_params && !dweight_done) {
    for (const GroupPart& part : group_parts(rows.graded, per)) {
      const Tensor dweight_part = planes_backward<scalar_t>(g, group_input(x, geo, part), w, rows.graded, part.begin,
                                                            part.end, geo, false, true)
                                      .second;
      if (!dweight.numel()) dweight = fresh_pages(w.sizes(), w.options(), /*zero=*/true);
      finish(part.begin, part.end, dweight_part.contiguous());
    }
    if (!dweight.numel()) dweight = fresh_pages(w.sizes(), w.options(), /*zero=*/true);  // no graded row
  }
  if (b.defined()) rows.zero_pruned(dbias.mutable_data_ptr<scalar_t>());
  return Grads{dx, dweight, dbias, dthreshold};
}

// The masked-dense backward: one dense convolution backward with the pruned filters zeroed (dx of the
// masked weight; G of every filter, which does not read the weight), then the epilogue over every row in
// place. g, w contiguous.
template <typename scalar_t>
Grads conv2d_bwd_dense(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                       const RowSets& rows, const Geometry& geo, bool need_dx, bool need_params) {
  const int64_t N = w.size(0), fan_in = w.numel() / std::max<int64_t>(N, 1), A = rows.num_active();
  Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()), dbias = at::empty({0}, x.options()),
         dthreshold = at::empty({0}, x.options());
  const bool want_dx = need_dx && A > 0, want_dw = need_params && rows.num_graded() > 0;
  if (want_dx || want_dw) {
    const Tensor wm = want_dx && A < N ? masked_copy<scalar_t>(w, 1, rows, fan_in) : w;
    Tensor dx_full, dw_full;
    std::tie(dx_full, dw_full, std::ignore) = conv_backward(g, x, wm, geo, geo.groups, want_dx, want_dw);
    if (want_dx) dx = dx_full;
    if (want_dw) dweight = dw_full.contiguous();
  }
  if (need_dx && A == 0) dx = at::zeros_like(x);
  if (!need_params) return Grads{dx, dweight, dbias, dthreshold};
  if (!want_dw) dweight = at::zeros(w.sizes(), w.options());
  finish_masked_dense(rows, w, bias, g.const_data_ptr<scalar_t>(), g.size(0), g.size(2) * g.size(3), dweight, dbias,
                      dthreshold);
  return Grads{dx, dweight, dbias, dthreshold};
}

// Gradients of conv2d_fwd, as for the Linear op; grad_y: [B, N, H', W']. Skipping or masked dense,
// whichever the choice table says for the call's signature.
Grads conv2d_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                 const Tensor& score, IntArrayRef geometry, int64_t ste, bool need_dx, bool need_params) {
  const char* op = "spafl::native_conv2d_bwd";
  const Geometry geo = conv_geometry(geometry, op);
  check_inputs(op, x, weight, bias, geo);
  const SpaflSte gate_kind = ste_from_code(ste);
  const Tensor w = weight.contiguous();
  const Tensor g = grad_y.contiguous();
  const Tensor s = score.contiguous();
  const int64_t N = w.size(0);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == x.size(0) && g.size(1) == N, op, ": grad_y must be [B, ", N,
              ", H', W'], got ", g.sizes());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N && s.scalar_type() == w.scalar_type(), op,
              ": score must be [N] in the weight's dtype");
  Grads out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spafl_cpp_conv2d_bwd", [&] {
    const RowSets rows(s.const_data_ptr<scalar_t>(), N, gate_kind, need_params);
    ChoiceKey key = key_head(kConvBwd, w);
    key.insert(key.end(), {batch_bucket(x.size(0)), x.size(1), x.size(2), x.size(3)});
    key.insert(key.end(), w.sizes().begin(), w.sizes().end());
    key.insert(key.end(), geometry.begin(), geometry.end());
    key.insert(key.end(), {bias.has_value(), ste, need_dx, need_params, row_bucket(rows.num_active(), N),
                           row_bucket(rows.num_graded(), N)});
    out = choose(
        key, pinned_path(),
        [&] { return conv2d_bwd_skip<scalar_t>(g, x, w, bias, s, rows, geo, need_dx, need_params); },
        [&] { return conv2d_bwd_dense<scalar_t>(g, x, w, bias, rows, geo, need_dx, need_params); });
  });
  return out;
}

}  // namespace
}  // namespace spafl::cpu

TORCH_LIBRARY_IMPL(spafl, CPU, m) {
  m.impl("native_conv2d_fwd", &spafl::cpu::conv2d_fwd);
  m.impl("native_conv2d_bwd", &spafl::cpu::conv2d_bwd);
}
