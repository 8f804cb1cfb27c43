// fastnode::initial_step_finish on CPU (its first half: initial_step_probe_cpu.cpp): the Hairer-Norsett-Wanner starting step
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

at::Tensor initial_step_finish_cpu(const at::Tensor& y0_in, const at::Tensor& k0_in, const at::Tensor& k1_in,
                                   const at::Tensor& h0_in, const at::Tensor& d1_in,
                                   const c10::optional<at::Tensor>& rtol_t, double rtol,
                                   const c10::optional<at::Tensor>& atol_t, double atol, at::IntArrayRef segments,
                                   double order) {
  const char* op = "initial_step_finish";
  check_initial(y0_in, k0_in, rtol_t, atol_t, segments, op);
  check_stages(y0_in, {k1_in}, 0, op);
  check_rows(h0_in, y0_in, at::kDouble, "h0", op);
  check_rows(d1_in, y0_in, at::kDouble, "d1", op);
  TORCH_CHECK(order > 0, "fastnode.initial_step_finish: order must be positive, got ", order);
  auto y0 = y0_in.contiguous();
  auto k0 = k0_in.contiguous();
  auto k1 = k1_in.contiguous();
  auto h0 = h0_in.contiguous();
  auto d1 = d1_in.contiguous();
  auto rt = rtol_t.has_value() ? rtol_t->contiguous() : at::Tensor();
  auto at_ = atol_t.has_value() ? atol_t->contiguous() : at::Tensor();
  const int64_t G = y0.size(0), N = y0.size(1);
  auto out = at::empty({G}, y0.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "initial_step_finish_cpu", [&] {
    using T = scalar_t;
    for (int64_t r = 0; r < G; ++r) {
      const T* y = y0.data_ptr<T>() + r * N;
      const T* a = k0.data_ptr<T>() + r * N;
      const T* b = k1.data_ptr<T>() + r * N;
      const T* rp = rt.defined() ? rt.data_ptr<T>() + (rt.size(0) > 1 ? r * N : 0) : nullptr;
      const T* ap = at_.defined() ? at_.data_ptr<T>() + (at_.size(0) > 1 ? r * N : 0) : nullptr;
      const double h = h0.data_ptr<double>()[r];
      const double d2 = row_norm<T>(y, rp, ap, static_cast<T>(rtol), static_cast<T>(atol), segments,
                                    [&](int64_t c) { return b[c] - a[c]; }) / h;
      const double e = d1.data_ptr<double>()[r];
      const double dmax = (std::isnan(d2) || d2 > e) ? d2 : e;  // torch.maximum propagates NaN
      const double h1 = dmax <= 1e-15 ? std::max(1e-6, h * 1e-3) : std::pow(0.01 / std::max(dmax, 1e-300), 1.0 / order);
      const double v = std::isnan(h1) ? h1 : std::min(100 * h, h1);
      out.data_ptr<double>()[r] = (std::isfinite(v) && v > 0) ? v : 1e-6;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("initial_step_finish", &initial_step_finish_cpu); }

}  // namespace fastnode
