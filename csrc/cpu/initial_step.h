// Shared by fastnode::initial_step_probe and fastnode::initial_step_finish on CPU (the Hairer-Norsett-Wanner starting
// step, see csrc/ops.cpp): their argument checks and the solver's RMS norm of a scaled row.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "../common.h"

namespace fastnode {

inline void check_initial(const at::Tensor& y0, const at::Tensor& k0, const c10::optional<at::Tensor>& rtol_t,
                          const c10::optional<at::Tensor>& atol_t, at::IntArrayRef segments, const char* op) {
  check_stages(y0, {k0}, 0, op);
  TORCH_CHECK(y0.device().is_cpu(), "fastnode.", op, ": CPU tensors only, got ", y0.device());
  check_tol(rtol_t, y0, "rtol_t", op);
  check_tol(atol_t, y0, "atol_t", op);
  check_segments(segments, y0.size(1), op);
}

// Per row: max over segments of sqrt(mean(x^2)) where x[c] = v(c) / (atol + |y0[c]| * rtol), v given by `val`.
template <typename T, typename F>
inline double row_norm(const T* y, const T* rp, const T* ap, T rtol, T atol, at::IntArrayRef seg, F val) {
  double best = 0.0;
  for (size_t s = 0; s < seg.size(); s += 2) {
    double sq = 0.0;
    for (int64_t c = seg[s]; c < seg[s + 1]; ++c) {
      const T scale = (ap ? ap[c] : atol) + std::abs(y[c]) * (rp ? rp[c] : rtol);
      const T x = val(c) / scale;
      sq += static_cast<double>(x) * static_cast<double>(x);
    }
    const double v = std::sqrt(sq / static_cast<double>(seg[s + 1] - seg[s]));
    best = (std::isnan(v) || v > best) ? v : best;  // a max that propagates NaN, as torch.amax
  }
  return best;
}

}  // namespace fastnode
