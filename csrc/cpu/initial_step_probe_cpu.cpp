// fastnode::initial_step_probe on CPU (its second half: initial_step_finish_cpu.cpp): the Hairer-Norsett-Wanner starting step
// (Solving ODEs I, II.4) around its one probe evaluation of func, each half in one pass over memory. The formulas
// and their order are TorchStepOps.initial_step's: scale = atol + |y0| * rtol (state dtype), d0 = ||y0 / scale||,
// d1 = ||k0 / scale||, h0 = 1e-6 if d0 or d1 < 1e-5 else 0.01 d0 / d1, y1 = y0 + h0 k0; then after k1 = f(t0 + h0, y1)
// d2 = ||(k1 - k0) / scale|| / h0 and h = min(100 h0, h1) with h1 = max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15
// else (0.01 / max(d1, d2))^(1 / order); a non-finite or non-positive h becomes 1e-6. || || is the solver's RMS
// norm (max over segments), its squares summed in float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "initial_step.h"

namespace fastnode {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> initial_step_probe_cpu(
    const at::Tensor& y0_in, const at::Tensor& k0_in, const c10::optional<at::Tensor>& rtol_t, double rtol,
    const c10::optional<at::Tensor>& atol_t, double atol, at::IntArrayRef segments) {
  check_initial(y0_in, k0_in, rtol_t, atol_t, segments, "initial_step_probe");
  auto y0 = y0_in.contiguous();
  auto k0 = k0_in.contiguous();
  auto rt = rtol_t.has_value() ? rtol_t->contiguous() : at::Tensor();
  auto at_ = atol_t.has_value() ? atol_t->contiguous() : at::Tensor();
  const int64_t G = y0.size(0), N = y0.size(1);
  auto dopt = y0.options().dtype(at::kDouble);
  auto h0 = at::empty({G}, dopt);
  auto d1 = at::empty({G}, dopt);
  auto y1 = at::empty_like(y0);
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "initial_step_probe_cpu", [&] {
    using T = scalar_t;
    const T* yp = y0.data_ptr<T>();
    const T* kp = k0.data_ptr<T>();
    T* y1p = y1.data_ptr<T>();
    for (int64_t r = 0; r < G; ++r) {
      const T* y = yp + r * N;
      const T* k = kp + r * N;
      const T* rp = rt.defined() ? rt.data_ptr<T>() + (rt.size(0) > 1 ? r * N : 0) : nullptr;
      const T* ap = at_.defined() ? at_.data_ptr<T>() + (at_.size(0) > 1 ? r * N : 0) : nullptr;
      const T rs = static_cast<T>(rtol), as = static_cast<T>(atol);
      const double a = row_norm<T>(y, rp, ap, rs, as, segments, [&](int64_t c) { return y[c]; });
      const double b = row_norm<T>(y, rp, ap, rs, as, segments, [&](int64_t c) { return k[c]; });
      const double h = (a < 1e-5 || b < 1e-5) ? 1e-6 : 0.01 * a / std::max(b, 1e-300);
      const T hs = static_cast<T>(h);
      for (int64_t c = 0; c < N; ++c) y1p[r * N + c] = y[c] + hs * k[c];
      h0.data_ptr<double>()[r] = h;
      d1.data_ptr<double>()[r] = b;
    }
  });
  return {h0, y1, d1};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("initial_step_probe", &initial_step_probe_cpu); }

}  // namespace fastnode
