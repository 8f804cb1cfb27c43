// Shared declarations of the fastnode ops: the step-size controller (one formula for CPU and CUDA), the
// output-time search, and the argument checks every implementation runs before touching memory.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__CUDACC__)
#define FASTNODE_HD __host__ __device__
#else
#define FASTNODE_HD
#endif

namespace fastnode {

#if defined(__CUDACC__)
#define FASTNODE_MATH ::
#else
#define FASTNODE_MATH std::
#endif

// Controller settings, unpacked from the `float[] ctrl` argument (see csrc/ops.cpp for the order).
struct CtrlCfg {
  double order, safety, ifactor, dfactor, min_step, max_step;
  bool pi;
  double alpha, beta;
};

inline CtrlCfg unpack_ctrl(at::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 9, "fastnode: ctrl must hold 9 values (order, safety, ifactor, dfactor, min_step, "
              "max_step, pi, alpha, beta), got ", c.size());
  return CtrlCfg{c[0], c[1], c[2], c[3], c[4], c[5], c[6] != 0.0, c[7], c[8]};
}

// One group's decision, the same formulas and order of operations as TorchStepOps.controller:
// a NaN ratio counts as inf (reject, shrink by dfactor); no shrink after an accepted step; growth capped by
// ifactor; the next step clamped to [min_step, max_step]; a group not running keeps its step.
FASTNODE_HD inline void control_one(const CtrlCfg& c, double h, double ratio, double prev, bool running,
                                    bool* accept, double* h_next, double* prev_out) {
  const double r = FASTNODE_MATH isnan(ratio) ? INFINITY : ratio;
  bool acc = r <= 1.0;
  if (c.min_step > 0) acc = acc || (FASTNODE_MATH isfinite(r) && h <= c.min_step);
  acc = acc && running;
  double factor = FASTNODE_MATH pow(r, -1.0 / c.order) * c.safety;
  double p = prev;
  if (c.pi) {
    const double pi = FASTNODE_MATH pow(r, -c.alpha / c.order) * FASTNODE_MATH pow(prev, c.beta / c.order) * c.safety;
    factor = acc ? pi : FASTNODE_MATH fmin(factor, 1.0);
    if (acc) p = FASTNODE_MATH fmax(r, 1e-10);
  }
  const double lower = r < 1.0 ? 1.0 : c.dfactor;
  factor = FASTNODE_MATH fmin(FASTNODE_MATH fmax(factor, lower), c.ifactor);
  double hn = FASTNODE_MATH fmin(FASTNODE_MATH fmax(h * factor, c.min_step), c.max_step);
  *accept = acc;
  *h_next = running ? hn : h;
  *prev_out = p;
}

// Checks shared by every backend: K is a non-empty list of [G, N] tensors like y; weights fit the stages.
inline void check_stages(const at::Tensor& y, at::TensorList K, size_t n_weights, const char* op) {
  TORCH_CHECK(y.dim() == 2, "fastnode.", op, ": y must be [G, N], got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, "fastnode.", op,
              ": y must be float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(n_weights <= K.size(), "fastnode.", op, ": ", n_weights, " weights for ", K.size(), " stages");
  for (size_t j = 0; j < K.size(); ++j) {
    TORCH_CHECK(K[j].sizes() == y.sizes(), "fastnode.", op, ": stage ", j, " has shape ", K[j].sizes(),
                ", expected ", y.sizes());
    TORCH_CHECK(K[j].scalar_type() == y.scalar_type() && K[j].device() == y.device(), "fastnode.", op,
                ": stage ", j, " must match y's dtype and device");
  }
}

inline void check_rows(const at::Tensor& x, const at::Tensor& y, at::ScalarType dt, const char* what,
                       const char* op) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == y.size(0), "fastnode.", op, ": ", what, " must be [G] with G = ",
              y.size(0), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dt && x.device() == y.device(), "fastnode.", op, ": ", what, " must be ",
              dt, " on ", y.device(), ", got ", x.scalar_type(), " on ", x.device());
}

// Optional per-element tolerance: [R, N] with R in {1, G}, the state's dtype.
inline void check_tol(const c10::optional<at::Tensor>& t, const at::Tensor& y, const char* what, const char* op) {
  if (!t.has_value()) return;
  const auto& x = *t;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == y.size(1) && (x.size(0) == 1 || x.size(0) == y.size(0)), "fastnode.",
              op, ": ", what, " must be [1, N] or [G, N] like y ", y.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.device() == y.device(), "fastnode.", op, ": ", what,
              " must match y's dtype and device");
}

// Segment bounds [s0, e0, s1, e1, ...]: non-empty, sorted, inside the row.
inline void check_segments(at::IntArrayRef seg, int64_t N, const char* op) {
  TORCH_CHECK(!seg.empty() && seg.size() % 2 == 0, "fastnode.", op, ": segments must be pairs (start, end)");
  for (size_t s = 0; s < seg.size(); s += 2)
    TORCH_CHECK(0 <= seg[s] && seg[s] < seg[s + 1] && seg[s + 1] <= N, "fastnode.", op, ": bad segment [",
                seg[s], ", ", seg[s + 1], ") for N = ", N);
}

// Every check of finish_control's arguments (CPU and CUDA share them); returns the controller settings.
inline CtrlCfg check_finish_control(const at::Tensor& y, at::TensorList K, const at::Tensor& h, at::ArrayRef<double> b,
                                    at::ArrayRef<double> e, const c10::optional<at::Tensor>& rtol_t,
                                    const c10::optional<at::Tensor>& atol_t, at::IntArrayRef segments,
                                    const at::Tensor& h_ctl, const at::Tensor& prev, const at::Tensor& running,
                                    const c10::optional<at::Tensor>& floor, at::ArrayRef<double> ctrl) {
  const char* op = "finish_control";
  check_stages(y, K, std::max(b.size(), e.size()), op);
  TORCH_CHECK(b.size() == K.size() && e.size() == K.size(), "fastnode.finish_control: b and e need one weight per "
              "stage (", K.size(), "), got ", b.size(), " and ", e.size());
  check_rows(h, y, y.scalar_type(), "h", op);
  check_rows(h_ctl, y, at::kDouble, "h_ctl", op);
  check_rows(prev, y, at::kDouble, "prev_ratio", op);
  check_rows(running, y, at::kBool, "running", op);
  if (floor.has_value()) check_rows(*floor, y, at::kDouble, "ratio_floor", op);
  check_tol(rtol_t, y, "rtol_t", op);
  check_tol(atol_t, y, "atol_t", op);
  check_segments(segments, y.size(1), op);
  return unpack_ctrl(ctrl);
}

// A [G] tensor of dtype dt (the time-side tensors of step_begin/step_end).
inline void check_time(const at::Tensor& x, int64_t G, const char* what, const char* op, at::ScalarType dt = at::kDouble) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == G, "fastnode.", op, ": ", what, " must be [G] with G = ", G, ", got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dt, "fastnode.", op, ": ", what, " must be ", dt, ", got ", x.scalar_type());
}

// Number of entries of the increasing row [p, p + T) that are <= x (torch.searchsorted(..., right=True)).
inline int64_t count_le(const double* p, int64_t T, double x) { return std::upper_bound(p, p + T, x) - p; }

}  // namespace fastnode
