// fastnode::finish_control on CPU: a step's solution, scaled-error norm, finiteness and controller decision in one
// pass over memory (parallel over tiles), then one loop over the groups; float32/float64 states, float64 time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "tiles.h"

namespace fastnode {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_control_cpu(
    const at::Tensor& y_in, at::TensorList K, const at::Tensor& h_in, at::ArrayRef<double> b,
    at::ArrayRef<double> e, const c10::optional<at::Tensor>& rtol_t, double rtol, const c10::optional<at::Tensor>& atol_t,
    double atol, at::IntArrayRef segments, const at::Tensor& h_ctl_in, const at::Tensor& prev_in,
    const at::Tensor& running_in, const c10::optional<at::Tensor>& floor_in, at::ArrayRef<double> ctrl) {
  const CtrlCfg cfg = check_finish_control(y_in, K, h_in, b, e, rtol_t, atol_t, segments, h_ctl_in, prev_in, running_in,
                                           floor_in, ctrl);
  const int64_t G = y_in.size(0), N = y_in.size(1);

  auto y = y_in.contiguous();
  auto h = h_in.contiguous();
  auto Kc = contiguous_stages(K, K.size());
  auto rt = rtol_t.has_value() ? rtol_t->contiguous() : at::Tensor();
  auto at_ = atol_t.has_value() ? atol_t->contiguous() : at::Tensor();
  auto y_new = at::empty_like(y);
  const int64_t nseg = static_cast<int64_t>(segments.size() / 2);
  Tiles tl(G, N);
  // Per tile: the sum of squares of the scaled error in each segment, and whether all its values are finite.
  std::vector<double> part(static_cast<size_t>(tl.n * nseg), 0.0);
  std::vector<uint8_t> finite(static_cast<size_t>(tl.n), 1);

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "finish_control_cpu", [&] {
    using T = scalar_t;
    const size_t S = Kc.size();
    // Zero weights are skipped, as in the reference (a non-finite stage with weight 0 must not leak in).
    std::vector<const T*> bk, ek;
    std::vector<T> bv, ev;
    for (size_t j = 0; j < S; ++j) {
      if (b[j] != 0.0) {
        bk.push_back(Kc[j].data_ptr<T>());
        bv.push_back(static_cast<T>(b[j]));
      }
      if (e[j] != 0.0) {
        ek.push_back(Kc[j].data_ptr<T>());
        ev.push_back(static_cast<T>(e[j]));
      }
    }
    const size_t SB = bk.size();
    const T* yp = y.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    const T* rp = rt.defined() ? rt.data_ptr<T>() : nullptr;
    const T* ap = at_.defined() ? at_.data_ptr<T>() : nullptr;
    const int64_t r_stride = rt.defined() && rt.size(0) > 1 ? N : 0;
    const int64_t a_stride = at_.defined() && at_.size(0) > 1 ? N : 0;
    const T rtol_s = static_cast<T>(rtol), atol_s = static_cast<T>(atol);
    T* yn = y_new.data_ptr<T>();
    const T* klast = Kc[S - 1].data_ptr<T>();
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t tb, int64_t te) {
      std::vector<T> sb(static_cast<size_t>(std::min(N, kChunk))), se(sb.size());
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r = tl.row(t), off = r * N, lo = tl.lo(t), hi = tl.hi(t), len = hi - lo, base = off + lo;
        const T hr = hp[r];
        lincomb_tile<T>(bk, bv, base, len, sb.data());
        lincomb_tile<T>(ek, ev, base, len, se.data());
        // y_new, and finiteness of y_new + k_last as the reference checks it: (z - z) is 0 for finite z and NaN
        // otherwise, so the sum is NaN iff some value is non-finite (a branch-free, vectorisable test).
        const T* yv = yp + base;
        const T* kl = klast + base;
        T* ynv = yn + base;
        T nanacc = 0;
        if (SB == 0) {
          for (int64_t c = 0; c < len; ++c) ynv[c] = yv[c];
        } else {
          for (int64_t c = 0; c < len; ++c) ynv[c] = yv[c] + hr * sb[c];
        }
        for (int64_t c = 0; c < len; ++c) {
          const T z = ynv[c] + kl[c];
          nanacc += z - z;
        }
        finite[t] = nanacc == T(0);
        for (int64_t s = 0; s < nseg; ++s) {
          const int64_t a = std::max(lo, segments[2 * s]), z = std::min(hi, segments[2 * s + 1]);
          double sq = 0.0;
          for (int64_t c = a - lo; c < z - lo; ++c) {
            const int64_t col = lo + c;
            const T rtv = rp ? rp[r * r_stride + col] : rtol_s;
            const T atv = ap ? ap[r * a_stride + col] : atol_s;
            const T scale = std::max(std::abs(yv[c]), std::abs(ynv[c])) * rtv + atv;
            const T x = (se[c] * hr) / scale;
            sq += static_cast<double>(x) * static_cast<double>(x);
          }
          part[t * nseg + s] += sq;
        }
      }
    });
  });

  auto dopt = y.options().dtype(at::kDouble);
  auto ratio = at::empty({G}, dopt);
  auto ok = at::empty({G}, y.options().dtype(at::kBool));
  auto accept = at::empty({G}, y.options().dtype(at::kBool));
  auto h_next = at::empty({G}, dopt);
  auto prev_out = at::empty({G}, dopt);
  auto hc = h_ctl_in.contiguous();
  auto pv = prev_in.contiguous();
  auto rn = running_in.contiguous();
  auto fl = floor_in.has_value() ? floor_in->contiguous() : at::Tensor();
  const double* hcp = hc.data_ptr<double>();
  const double* pvp = pv.data_ptr<double>();
  const bool* rnp = rn.data_ptr<bool>();
  const double* flp = fl.defined() ? fl.data_ptr<double>() : nullptr;
  double* rat = ratio.data_ptr<double>();
  bool* okp = ok.data_ptr<bool>();
  bool* acp = accept.data_ptr<bool>();
  double* hnp = h_next.data_ptr<double>();
  double* pop = prev_out.data_ptr<double>();
  for (int64_t r = 0; r < G; ++r) {
    double rr = 0.0;
    bool fin = true;
    for (int64_t s = 0; s < nseg; ++s) {
      double sq = 0.0;
      for (int64_t c = 0; c < tl.chunks; ++c) sq += part[(r * tl.chunks + c) * nseg + s];
      const double len = static_cast<double>(segments[2 * s + 1] - segments[2 * s]);
      const double v = std::sqrt(sq / len);
      // max that propagates NaN, as torch.amax does.
      rr = (std::isnan(v) || v > rr) ? v : rr;
    }
    for (int64_t c = 0; c < tl.chunks; ++c) fin = fin && finite[r * tl.chunks + c];
    if (flp) rr = (std::isnan(flp[r]) || flp[r] > rr) ? flp[r] : rr;
    if (!fin) rr = std::numeric_limits<double>::infinity();
    rat[r] = rr;
    okp[r] = fin;
    control_one(cfg, hcp[r], rr, pvp[r], rnp[r], &acp[r], &hnp[r], &pop[r]);
  }
  return {y_new, ratio, ok, accept, h_next, prev_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("finish_control", &finish_control_cpu); }

}  // namespace fastnode
