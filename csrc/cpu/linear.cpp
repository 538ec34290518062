// CPU kernels of the `cpp` backend's sparse Linear (docs/DESIGN.md §2): y = x @ (m * W).T + m * b.
//
// Work scales with the active rows: the dense products run on compact panels of active (forward,
// dx) or graded (dW) rows through ATen's BLAS. Panels are runs of consecutive rows used in place, or
// bounded chunks gathered into a reused buffer, so no copy of the whole active weight is ever made
// and no large temporary is mapped afresh per call. At density 1 the ops are the dense ones plus the
// score pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "paths.h"
#include "rows.h"

namespace spafl::cpu {
namespace {

using at::Tensor;

void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the cpp backend supports float32 and float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 2 && x.size(1) == weight.size(1), op,
              ": expected x [M, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", x.scalar_type(), " differs from weight's");
  TORCH_CHECK(
      !bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type()), op,
      ": bias must be [N] in the weight's dtype");
}

// The row-skipping forward: products over the active rows (and x's live columns) only, scattered into y.
template <typename scalar_t>
Tensor linear_fwd_skip(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& score,
                       const RowSets& rows) {
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  Tensor y;
  const int64_t A = rows.num_active();
  const LiveInputs in =
      A ? live_inputs<scalar_t>(x, M, K, 1, score.const_data_ptr<scalar_t>(), rows.active) : LiveInputs{};
  if (A == N && !in.skip) {  // density 1: exactly the dense op
    y = bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
    return y;
  }
  // The product reads L columns: all of x, or its live ones (then gathered, with those columns of
  // each active row).
  const int64_t L = in.skip ? static_cast<int64_t>(in.live.size()) : K;
  const Tensor xs = in.skip ? gather_live<scalar_t>(x, in) : x;
  // z[:, j] = x @ W[active[j]]: one GEMM per segment of the active rows, into z's column slices.
  Tensor z = L ? at::empty({M, A}, x.options()) : at::zeros({M, A}, x.options());
  const int64_t chunk = panel_rows(L, w.element_size(), A);
  Tensor panel;
  for (const Segment& s : L ? segments(rows.active.data(), A, chunk, kMinRun) : std::vector<Segment>{}) {
    Tensor rows_w;
    if (s.run && !in.skip) {
      rows_w = w.narrow(0, rows.active[s.begin], s.size());
    } else {
      if (!panel.defined()) panel = at::empty({chunk, L}, w.options());
      scalar_t* dst = panel.mutable_data_ptr<scalar_t>();
      if (in.skip) {
        gather_rows_cols(w.const_data_ptr<scalar_t>(), K, 1, rows.active.data() + s.begin, s.size(), in.live.data(), L,
                         dst);
      } else {
        gather_planes(w.const_data_ptr<scalar_t>(), 1, N, K, rows.active.data() + s.begin, s.size(), dst);
      }
      rows_w = panel.narrow(0, 0, s.size());
    }
    Tensor out = z.narrow(1, s.begin, s.size());
    at::mm_out(out, xs, rows_w.t());
  }
  // Scatter into y, bias added on the way; every element of y is written once, pruned ones as 0.
  y = at::empty({M, N}, x.options());
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const Tensor b = bias ? bias->contiguous() : Tensor();  // held: its data must outlive the loop below
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t* idx = rows.active.data();
  at::parallel_for(0, M, grain(N), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      scalar_t* yr = yp + m * N;
      const scalar_t* zr = zp + m * A;
      std::fill(yr, yr + N, scalar_t(0));
      if (bp) {
        for (int64_t j = 0; j < A; ++j) yr[idx[j]] = zr[j] + bp[idx[j]];
      } else {
        for (int64_t j = 0; j < A; ++j) yr[idx[j]] = zr[j];
      }
    }
  });
  return y;
}

// The masked-dense forward: the dense product, then the pruned rows' outputs zeroed.
template <typename scalar_t>
Tensor linear_fwd_dense(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const RowSets& rows) {
  Tensor y = bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  if (rows.num_active() < rows.n) zero_pruned_planes(y.mutable_data_ptr<scalar_t>(), x.size(0), rows, 1);
  return y;
}

// x [M, K], weight [N, K], bias [N]?, threshold [N] -> (y [M, N], score [N]). Skipping or masked dense,
// whichever the choice table (paths.h) says for the call's signature.
std::tuple<Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& threshold) {
  check_inputs("spafl::native_linear_fwd", x, weight, bias);
  const Tensor w = weight.contiguous();
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  Tensor score = row_scores(w, threshold);
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spafl_cpp_linear_fwd", [&] {
    const RowSets rows(score.const_data_ptr<scalar_t>(), N, SPAFL_STE_IDENTITY, /*with_gates=*/false);
    const int64_t A = rows.num_active();
    if (A == 0) {
      y = at::zeros({M, N}, x.options());
      return;
    }
    ChoiceKey key = key_head(kLinearFwd, w);
    key.insert(key.end(), {batch_bucket(M), K, N, bias.has_value(), row_bucket(A, N)});
    y = choose(
        key, pinned_path(), [&] { return linear_fwd_skip<scalar_t>(x, w, bias, score, rows); },
        [&] { return linear_fwd_dense<scalar_t>(x, w, bias, rows); });
  });
  return {y, score};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The row-skipping backward: products over the active (dx) and graded (dW) rows only. g, w, s contiguous.
template <typename scalar_t>
Grads linear_bwd_skip(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                      const Tensor& s, RowSets rows, bool need_dx, bool need_params) {
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  // Distinct empty tensors where a gradient is not asked for: op outputs must not alias each other.
  Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()), dbias = at::empty({0}, x.options()),
         dthreshold = at::empty({0}, x.options());
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  if (need_params) rows.drop_silent(gp, M, 1);
  const int64_t chunk = panel_rows(K, w.element_size(), N);
  Tensor panel, g_cols;  // reused buffers: [chunk, K] weight rows; M * chunk grad columns

  // dx: one product per segment of the active rows: grad columns (g.narrow or gathered) times the
  // matching weight rows (W.narrow or gathered).
  auto grad_columns = [&](const int64_t* idx, const Segment& seg) -> Tensor {
    if (seg.run) return g.narrow(1, idx[seg.begin], seg.size());
    if (!g_cols.defined()) g_cols = at::empty({M * chunk}, g.options());
    Tensor cols = g_cols.narrow(0, 0, M * seg.size()).view({M, seg.size()});
    gather_planes(gp, M, N, 1, idx + seg.begin, seg.size(), cols.mutable_data_ptr<scalar_t>());
    return cols;
  };
  auto panel_rows_of = [&](int64_t size) {
    if (!panel.defined()) panel = at::empty({chunk, K}, w.options());
    return panel.narrow(0, 0, size);
  };

  if (need_dx) {
    const int64_t A = rows.num_active();
    if (A == N) {
      dx = at::mm(g, w);
    } else if (A == 0) {
      dx = at::zeros({M, K}, x.options());
    } else {
      dx = at::empty({M, K}, x.options());
      bool first = true;
      for (const Segment& seg : segments(rows.active.data(), A, chunk, kMinRun)) {
        const Tensor cols = grad_columns(rows.active.data(), seg);
        Tensor rows_w;
        if (seg.run) {
          rows_w = w.narrow(0, rows.active[seg.begin], seg.size());
        } else {
          rows_w = panel_rows_of(seg.size());
          gather_planes(wp, 1, N, K, rows.active.data() + seg.begin, seg.size(), rows_w.mutable_data_ptr<scalar_t>());
        }
        if (first) {
          at::mm_out(dx, cols, rows_w);
          first = false;
        } else {
          dx.addmm_(cols, rows_w);
        }
      }
    }
  }
  if (!need_params) return Grads{dx, dweight, dbias, dthreshold};

  // dL/db_i = m_i * gsum_i, with gsum = dL/dy summed over the batch: dbias holds gsum until the
  // rows are finished (dL/dm of a pruned row with an open gate needs its gsum), then is masked.
  const scalar_t* gsum_p = nullptr;
  const scalar_t* bp = nullptr;
  Tensor b;
  if (bias) {
    b = bias->contiguous();
    bp = b.const_data_ptr<scalar_t>();
    dbias = at::empty({N}, w.options());
    plane_sums(gp, M, N, 1, dbias.mutable_data_ptr<scalar_t>());
    gsum_p = dbias.const_data_ptr<scalar_t>();
  }
  dthreshold = at::empty({N}, w.options());
  scalar_t* dthr = dthreshold.mutable_data_ptr<scalar_t>();
  std::fill(dthr, dthr + N, scalar_t(0));
  const int64_t R = rows.num_graded();
  // Input columns that are zero over the batch add nothing to G = g^T x: each segment's product then
  // reads x's live columns only and is spread into its dW rows with zeros on the dead columns, unless
  // dL/dy holds a NaN or infinity (times a zero input: NaN in G, as in dense). Found again, not saved by
  // the forward: the op saves nothing but its inputs and the score.
  LiveInputs in = R ? live_inputs<scalar_t>(x, M, K, 1, s.const_data_ptr<scalar_t>(), rows.active) : LiveInputs{};
  if (in.skip && !all_finite(gp, g.numel())) in = LiveInputs{};
  const int64_t L = static_cast<int64_t>(in.live.size());
  const Tensor xs = in.skip ? gather_live<scalar_t>(x, in) : Tensor();
  panel.reset();  // the dx phase's buffers are not kept alive beside dW
  g_cols.reset();
  // Rows never written (not graded) stay untouched zero pages. Each segment's G lands in dW's own
  // rows (its run, or a block at its first row that finish_block spreads out), so no buffer beside
  // dW holds weight rows and the peak memory stays dense's.
  dweight = fresh_pages({N, K}, w.options(), /*zero=*/R < N);
  scalar_t* dwp = dweight.mutable_data_ptr<scalar_t>();
  const GradRows<scalar_t> grads{rows, wp, bp, gsum_p, K, dwp, dthr};
  for (const Segment& seg : segments(rows.graded.data(), R, chunk, kMinRun)) {
    const int64_t base = rows.graded[seg.begin], size = seg.size();
    Tensor cols;
    int64_t scratch_rows = 0;
    if (seg.run) {
      cols = g.narrow(1, base, size);
    } else {
      // Gathered grad columns go to dW rows just past the block while those lie inside the
      // segment's span (finish_block zeroes what is left of them), else to a buffer.
      const int64_t need = (M * size + K - 1) / K;
      scalar_t* dst;
      if (base + size + need <= rows.graded[seg.end - 1] + 1) {
        dst = dwp + (base + size) * K;
        scratch_rows = need;
      } else {
        if (!g_cols.defined()) g_cols = at::empty({M * chunk}, g.options());
        dst = g_cols.mutable_data_ptr<scalar_t>();
      }
      gather_planes(gp, M, N, 1, rows.graded.data() + seg.begin, size, dst);
      cols = at::from_blob(dst, {M, size}, g.options());
    }
    Tensor out = dweight.narrow(0, base, size);
    if (in.skip) {
      const Tensor live_g = at::mm(cols.t(), xs).contiguous();  // [size, L]
      scatter_cols(live_g.const_data_ptr<scalar_t>(), size, L, 1, in.live.data(), K, out.mutable_data_ptr<scalar_t>());
    } else {
      at::mm_out(out, cols.t(), x);
    }
    grads.finish_block(seg.begin, seg.end, scratch_rows);
  }
  if (R < N) map_unwritten(dweight);
  if (bias) rows.zero_pruned(dbias.mutable_data_ptr<scalar_t>());
  return Grads{dx, dweight, dbias, dthreshold};
}

// The masked-dense backward: dx = dL/dy @ (m * W) (the smaller of dL/dy and W masked), G = dL/dy^T x for
// every row, then the epilogue over every row in place. g, w contiguous.
template <typename scalar_t>
Grads linear_bwd_dense(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                       const RowSets& rows, bool need_dx, bool need_params) {
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0), A = rows.num_active();
  Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()), dbias = at::empty({0}, x.options()),
         dthreshold = at::empty({0}, x.options());
  if (need_dx) {
    if (A == N) {
      dx = at::mm(g, w);
    } else if (A == 0) {
      dx = at::zeros({M, K}, x.options());
    } else if (M <= K) {
      dx = at::mm(masked_copy<scalar_t>(g, M, rows, 1), w);
    } else {
      dx = at::mm(g, masked_copy<scalar_t>(w, 1, rows, K));
    }
  }
  if (!need_params) return Grads{dx, dweight, dbias, dthreshold};
  dweight = at::mm(g.t(), x);  // [N, K], contiguous
  finish_masked_dense(rows, w, bias, g.const_data_ptr<scalar_t>(), M, 1, dweight, dbias, dthreshold);
  return Grads{dx, dweight, dbias, dthreshold};
}

// grad_y [M, N], x [M, K], weight [N, K], bias [N]?, score [N]
//   -> (dx [M, K], dweight [N, K], dbias [N], dthreshold [N]), empty where not asked for. Skipping or
// masked dense, whichever the choice table says for the call's signature.
Grads linear_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                 const Tensor& score, int64_t ste, bool need_dx, bool need_params) {
  check_inputs("spafl::native_linear_bwd", x, weight, bias);
  const SpaflSte gate_kind = ste_from_code(ste);
  const Tensor w = weight.contiguous();
  const Tensor g = grad_y.contiguous();
  const Tensor s = score.contiguous();
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == M && g.size(1) == N, "spafl::native_linear_bwd: grad_y must be [", M, ", ",
              N, "], got ", g.sizes());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N && s.scalar_type() == w.scalar_type(),
              "spafl::native_linear_bwd: score must be [N] in the weight's dtype");
  Grads out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spafl_cpp_linear_bwd", [&] {
    const RowSets rows(s.const_data_ptr<scalar_t>(), N, gate_kind, need_params);
    ChoiceKey key = key_head(kLinearBwd, w);
    key.insert(key.end(), {batch_bucket(M), K, N, bias.has_value(), ste, need_dx, need_params,
                           row_bucket(rows.num_active(), N), row_bucket(rows.num_graded(), N)});
    out = choose(
        key, pinned_path(), [&] { return linear_bwd_skip<scalar_t>(g, x, w, bias, s, rows, need_dx, need_params); },
        [&] { return linear_bwd_dense<scalar_t>(g, x, w, bias, rows, need_dx, need_params); });
  });
  return out;
}

}  // namespace
}  // namespace spafl::cpu

TORCH_LIBRARY_IMPL(spafl, CPU, m) {
  m.impl("native_linear_fwd", &spafl::cpu::linear_fwd);
  m.impl("native_linear_bwd", &spafl::cpu::linear_bwd);
}
