// CPU implementations of the fastnode step ops: one pass over memory per op, parallel over rows and column
// chunks with at::parallel_for, float32 and float64 states, float64 time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../step_ops.h"

namespace fastnode {
namespace {

// Work is split into tiles of one row x up to kChunk columns; a thread takes at least kGrainElems elements so
// small problems (the common neural-ODE case) run on the calling thread with no fork/join cost.
constexpr int64_t kChunk = 16384;
constexpr int64_t kGrainElems = 65536;

struct Tiles {
  int64_t G, N, chunks, n, grain;
  Tiles(int64_t G_, int64_t N_) : G(G_), N(N_) {
    chunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
    n = G * chunks;
    const int64_t per_tile = std::min(N, kChunk);
    grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_tile));
  }
  int64_t row(int64_t t) const { return t / chunks; }
  int64_t lo(int64_t t) const { return (t % chunks) * kChunk; }
  int64_t hi(int64_t t) const { return std::min(N, lo(t) + kChunk); }
};

// out[c] = y[c] + h * (w0 k0[off + c] + w1 k1[off + c] + ...) for c < len, with the reference's association.
// Stage-outer loops over a tile that fits in cache: each inner loop is a plain vectorisable axpy.
template <typename T>
inline void combine_tile(const T* y, const std::vector<const T*>& k, const std::vector<T>& w, size_t first,
                         int64_t off, T h, int64_t len, T* out) {
  const size_t S = k.size();
  if (S == first) {
    for (int64_t c = 0; c < len; ++c) out[c] = y[c];
    return;
  }
  const T* k0 = k[first] + off;
  const T w0 = w[first];
  for (int64_t c = 0; c < len; ++c) out[c] = w0 * k0[c];
  for (size_t j = first + 1; j < S; ++j) {
    const T* kj = k[j] + off;
    const T wj = w[j];
    for (int64_t c = 0; c < len; ++c) out[c] = out[c] + wj * kj[c];
  }
  for (int64_t c = 0; c < len; ++c) out[c] = y[c] + h * out[c];
}

// acc[c] = w0 k0[off + c] + w1 k1[off + c] + ... (no state added); zero stages leave acc at 0.
template <typename T>
inline void lincomb_tile(const std::vector<const T*>& k, const std::vector<T>& w, int64_t off, int64_t len, T* acc) {
  if (k.empty()) {
    for (int64_t c = 0; c < len; ++c) acc[c] = 0;
    return;
  }
  const T* k0 = k[0] + off;
  for (int64_t c = 0; c < len; ++c) acc[c] = w[0] * k0[c];
  for (size_t j = 1; j < k.size(); ++j) {
    const T* kj = k[j] + off;
    const T wj = w[j];
    for (int64_t c = 0; c < len; ++c) acc[c] = acc[c] + wj * kj[c];
  }
}

std::vector<at::Tensor> contiguous_stages(at::TensorList K, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t j = 0; j < n; ++j) out.push_back(K[j].contiguous());
  return out;
}

at::Tensor rk_combine_cpu(const at::Tensor& y_in, at::TensorList K, const at::Tensor& h_in, at::ArrayRef<double> w) {
  check_stages(y_in, K, w.size(), "rk_combine");
  check_rows(h_in, y_in, y_in.scalar_type(), "h", "rk_combine");
  auto y = y_in.contiguous();
  auto h = h_in.contiguous();
  std::vector<int64_t> idx;
  for (size_t j = 0; j < w.size(); ++j)
    if (w[j] != 0.0) idx.push_back(static_cast<int64_t>(j));
  auto Kc = contiguous_stages(K, w.size());
  auto out = at::empty_like(y);
  const int64_t G = y.size(0), N = y.size(1);
  if (G * N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rk_combine_cpu", [&] {
    using T = scalar_t;
    std::vector<const T*> kp;
    std::vector<T> wv;
    for (auto j : idx) {
      kp.push_back(Kc[j].data_ptr<T>());
      wv.push_back(static_cast<T>(w[j]));
    }
    const T* yp = y.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    T* op = out.data_ptr<T>();
    Tiles tl(G, N);
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t base = tl.row(t) * N + tl.lo(t), len = tl.hi(t) - tl.lo(t);
        combine_tile<T>(yp + base, kp, wv, 0, base, hp[tl.row(t)], len, op + base);
      }
    });
  });
  return out;
}

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
    const size_t SB = bk.size(), SE = ek.size();
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

at::Tensor interpolate_cpu(const at::Tensor& y_in, at::TensorList K, const at::Tensor& h_in, const at::Tensor& theta_in,
                           at::ArrayRef<double> dense, int64_t P) {
  const char* op = "interpolate";
  check_stages(y_in, K, 0, op);
  TORCH_CHECK(P >= 1 && static_cast<int64_t>(dense.size()) == static_cast<int64_t>(K.size()) * P,
              "fastnode.interpolate: dense must hold S * P = ", K.size(), " * ", P, " values, got ", dense.size());
  check_rows(h_in, y_in, y_in.scalar_type(), "h", op);
  check_rows(theta_in, y_in, y_in.scalar_type(), "theta", op);
  auto y = y_in.contiguous();
  auto h = h_in.contiguous();
  auto th = theta_in.contiguous();
  const int64_t S = static_cast<int64_t>(K.size());
  std::vector<int64_t> used;
  for (int64_t j = 0; j < S; ++j) {
    bool any = false;
    for (int64_t p = 0; p < P; ++p) any = any || dense[j * P + p] != 0.0;
    if (any) used.push_back(j);
  }
  std::vector<at::Tensor> Kc;
  for (auto j : used) Kc.push_back(K[j].contiguous());
  auto out = at::empty_like(y);
  const int64_t G = y.size(0), N = y.size(1);
  if (G * N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "interpolate_cpu", [&] {
    using T = scalar_t;
    const size_t U = used.size();
    // Per-row weights w_j(theta_g) = sum_p dense[j, p] theta^(p+1), in the state dtype as the reference.
    std::vector<T> W(static_cast<size_t>(G) * U);
    const T* thp = th.data_ptr<T>();
    for (int64_t r = 0; r < G; ++r) {
      for (size_t u = 0; u < U; ++u) {
        T acc = 0, pw = thp[r];
        for (int64_t p = 0; p < P; ++p) {
          const T term = pw * static_cast<T>(dense[used[u] * P + p]);
          acc = p == 0 ? term : acc + term;
          pw = pw * thp[r];
        }
        W[r * U + u] = acc;
      }
    }
    std::vector<const T*> kp(U);
    for (size_t u = 0; u < U; ++u) kp[u] = Kc[u].data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    Tiles tl(G, N);
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t b, int64_t e) {
      std::vector<T> wr(U);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = tl.row(t), base = r * N + tl.lo(t), len = tl.hi(t) - tl.lo(t);
        for (size_t u = 0; u < U; ++u) wr[u] = W[r * U + u];
        combine_tile<T>(yp + base, kp, wr, 0, base, hp[r], len, op_ + base);
      }
    });
  });
  return out;
}

at::Tensor adjoint_weights_cpu(const at::Tensor& h_in, const at::Tensor& accept_in, at::ArrayRef<double> b) {
  TORCH_CHECK(h_in.dim() == 1 && (h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kDouble),
              "fastnode.adjoint_weights: h must be a float32/float64 [G] tensor, got ", h_in.scalar_type(), " ",
              h_in.sizes());
  check_rows(accept_in, h_in, at::kBool, "accept", "adjoint_weights");
  auto h = h_in.contiguous();
  auto acc = accept_in.contiguous();
  const int64_t G = h.size(0), S = static_cast<int64_t>(b.size());
  auto out = at::empty({S, G}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "adjoint_weights_cpu", [&] {
    using T = scalar_t;
    const T* hp = h.data_ptr<T>();
    const bool* ap = acc.data_ptr<bool>();
    T* op = out.data_ptr<T>();
    for (int64_t j = 0; j < S; ++j)
      for (int64_t g = 0; g < G; ++g) op[j * G + g] = (ap[g] ? hp[g] : T(0)) * static_cast<T>(b[j]);
  });
  return out;
}

void check_time(const at::Tensor& x, int64_t G, const char* what, const char* op, at::ScalarType dt = at::kDouble) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == G, "fastnode.", op, ": ", what, " must be [G] with G = ", G, ", got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dt, "fastnode.", op, ": ", what, " must be ", dt, ", got ", x.scalar_type());
}

// Number of entries of the increasing row [p, p + T) that are <= x (torch.searchsorted(..., right=True)).
inline int64_t count_le(const double* p, int64_t T, double x) { return std::upper_bound(p, p + T, x) - p; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_begin_cpu(
    const at::Tensor& t_in, const at::Tensor& h_in, const at::Tensor& run_in, const at::Tensor& t_out_in,
    const at::Tensor& t_end_in, bool to_outputs, at::ArrayRef<double> c, double sign, at::ScalarType sdt,
    bool squeeze) {
  const char* op = "step_begin";
  const int64_t G = t_in.size(0);
  check_time(t_in, G, "t", op);
  check_time(h_in, G, "h", op);
  check_time(run_in, G, "running", op, at::kBool);
  check_time(t_end_in, G, "t_end", op);
  TORCH_CHECK(t_out_in.dim() == 2 && t_out_in.size(0) == G && t_out_in.size(1) >= 1 &&
              t_out_in.scalar_type() == at::kDouble, "fastnode.step_begin: t_out must be float64 [G, T]");
  TORCH_CHECK(sdt == at::kFloat || sdt == at::kDouble, "fastnode.step_begin: state_dtype must be float32/64");
  TORCH_CHECK(!squeeze || G == 1, "fastnode.step_begin: squeeze needs G = 1");
  auto t = t_in.contiguous(), h = h_in.contiguous(), rn = run_in.contiguous(), to = t_out_in.contiguous(),
       te = t_end_in.contiguous();
  const int64_t T = to.size(1), S = static_cast<int64_t>(c.size());
  auto dopt = t.options();
  auto h_ctl = at::empty({G}, dopt), t_new = at::empty({G}, dopt);
  auto clipped = at::empty({G}, dopt.dtype(at::kBool));
  auto sopt = dopt.dtype(sdt);
  auto hy = at::empty({G}, sopt);
  auto ts = squeeze ? at::empty({S}, sopt) : at::empty({S, G}, sopt);
  auto tn = squeeze ? at::empty({}, sopt) : at::empty({G}, sopt);
  const double *tp = t.data_ptr<double>(), *hp = h.data_ptr<double>(), *op_ = to.data_ptr<double>(),
               *ep = te.data_ptr<double>();
  const bool* rp = rn.data_ptr<bool>();
  double *hc = h_ctl.data_ptr<double>(), *tnp = t_new.data_ptr<double>();
  bool* cp = clipped.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(sdt, "step_begin_cpu", [&] {
    using T_ = scalar_t;
    T_ *hyp = hy.data_ptr<T_>(), *tsp = ts.data_ptr<T_>(), *tep = tn.data_ptr<T_>();
    for (int64_t g = 0; g < G; ++g) {
      double limit = ep[g];
      if (to_outputs) {
        const double* row = op_ + g * T;
        limit = row[std::min(count_le(row, T, tp[g]), T - 1)];
      }
      const double room = limit - tp[g];
      const bool clip = rp[g] && hp[g] >= room;
      const double hcv = (clip ? room : hp[g]) * (rp[g] ? 1.0 : 0.0);
      const double tnv = clip ? limit : tp[g] + hcv;
      hc[g] = hcv;
      cp[g] = clip;
      tnp[g] = tnv;
      hyp[g] = static_cast<T_>(hcv);
      for (int64_t i = 0; i < S; ++i) {
        // As torch.addcmul on CPU (a fused multiply-add): the times func sees match the reference exactly.
        const T_ v = static_cast<T_>(std::fma(c[i], hcv, tp[g]));
        tsp[i * G + g] = sign < 0 ? -v : v;
      }
      const T_ e = static_cast<T_>(tnv);
      tep[g] = sign < 0 ? -e : e;
    }
  });
  return {h_ctl, clipped, t_new, hy, ts, tn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
step_end_cpu(const at::Tensor& accept_in, const at::Tensor& h_next_in, const at::Tensor& h_in, const at::Tensor& clip_in,
             const at::Tensor& run_in, const at::Tensor& t_in, const at::Tensor& t_new_in, const at::Tensor& t_end_in,
             const at::Tensor& n_att_in, const at::Tensor& n_acc_in, const at::Tensor& status_in,
             const at::Tensor& lnf_in, const at::Tensor& ok_in, const at::Tensor& next_in, const at::Tensor& t_out_in,
             int64_t max_num_steps, at::IntArrayRef codes) {
  const char* op = "step_end";
  const int64_t G = t_in.size(0);
  for (auto* p : {&accept_in, &clip_in, &run_in, &lnf_in, &ok_in}) check_time(*p, G, "a mask", op, at::kBool);
  for (auto* p : {&h_next_in, &h_in, &t_in, &t_new_in, &t_end_in}) check_time(*p, G, "a time", op);
  check_time(n_att_in, G, "n_att", op, at::kLong);
  check_time(n_acc_in, G, "n_acc", op, at::kLong);
  check_time(next_in, G, "next_idx", op, at::kLong);
  check_time(status_in, G, "status", op, at::kChar);
  TORCH_CHECK(t_out_in.dim() == 2 && t_out_in.size(0) == G && t_out_in.scalar_type() == at::kDouble,
              "fastnode.step_end: t_out must be float64 [G, T]");
  TORCH_CHECK(codes.size() == 4, "fastnode.step_end: codes must hold 4 status codes");
  auto acc = accept_in.contiguous(), hn = h_next_in.contiguous(), h = h_in.contiguous(), cl = clip_in.contiguous(),
       rn = run_in.contiguous(), t = t_in.contiguous(), tn = t_new_in.contiguous(), te = t_end_in.contiguous(),
       na = n_att_in.contiguous(), nc = n_acc_in.contiguous(), stv = status_in.contiguous(),
       lnf = lnf_in.contiguous(), ok = ok_in.contiguous(), nx = next_in.contiguous(), to = t_out_in.contiguous();
  const int64_t T = to.size(1);
  auto h_keep = at::empty({G}, t.options()), t_fut = at::empty({G}, t.options());
  auto n_att = at::empty({G}, na.options()), n_acc = at::empty({G}, nc.options());
  auto status = at::empty({G}, stv.options()), last_nf = at::empty({G}, lnf.options());
  auto stuck = at::empty({G}, rn.options()), run_next = at::empty({G}, rn.options());
  auto crossed = at::empty({G}, nx.options());
  auto packet = at::empty({3}, nx.options());
  const bool *ap = acc.data_ptr<bool>(), *clp = cl.data_ptr<bool>(), *rp = rn.data_ptr<bool>(),
             *lp = lnf.data_ptr<bool>(), *okp = ok.data_ptr<bool>();
  const double *hnp = hn.data_ptr<double>(), *hp = h.data_ptr<double>(), *tp = t.data_ptr<double>(),
               *tnp = tn.data_ptr<double>(), *tep = te.data_ptr<double>(), *top = to.data_ptr<double>();
  const int64_t *nap = na.data_ptr<int64_t>(), *ncp = nc.data_ptr<int64_t>(), *nxp = nx.data_ptr<int64_t>();
  const int8_t* sp = stv.data_ptr<int8_t>();
  double *hk = h_keep.data_ptr<double>(), *tf = t_fut.data_ptr<double>();
  int64_t *nao = n_att.data_ptr<int64_t>(), *nco = n_acc.data_ptr<int64_t>(), *cr = crossed.data_ptr<int64_t>();
  int8_t* so = status.data_ptr<int8_t>();
  bool *lo = last_nf.data_ptr<bool>(), *sk = stuck.data_ptr<bool>(), *rx = run_next.data_ptr<bool>();
  int64_t any_run = 0, any_stuck = 0, max_cross = std::numeric_limits<int64_t>::min();
  for (int64_t g = 0; g < G; ++g) {
    const bool a = ap[g], r = rp[g];
    // Same formulas, in the same order, as StepOps.step_end (torch_ops.py).
    const double hnext = (clp[g] && a) ? std::max(hnp[g], hp[g]) : hnp[g];
    const int64_t natt = nap[g] + (r ? 1 : 0);
    nao[g] = natt;
    nco[g] = ncp[g] + (a ? 1 : 0);
    const double tfut = a ? tnp[g] : tp[g];
    tf[g] = tfut;
    const double ttry = tfut + hnext;
    const bool no_move = !a && ttry <= tfut;
    const bool inf_try = std::isinf(ttry);
    const bool st = r && (no_move || inf_try || (natt >= max_num_steps && tfut < tep[g]));
    sk[g] = st;
    const bool lnf_v = r ? !okp[g] : lp[g];
    lo[g] = lnf_v;
    const int64_t fail = no_move ? (lnf_v ? codes[0] : codes[1]) : (inf_try ? codes[2] : codes[3]);
    so[g] = st ? static_cast<int8_t>(fail) : sp[g];
    const int64_t cross = a ? count_le(top + g * T, T, tnp[g]) - nxp[g] : 0;
    cr[g] = cross;
    const bool rnext = r && tfut < tep[g] && !st;
    rx[g] = rnext;
    hk[g] = r ? hnext : hp[g];
    any_run |= rnext;
    any_stuck |= st;
    max_cross = std::max(max_cross, cross);
  }
  int64_t* pk = packet.data_ptr<int64_t>();
  pk[0] = any_run;
  pk[1] = any_stuck;
  pk[2] = G > 0 ? max_cross : 0;
  return {h_keep, t_fut, n_att, n_acc, status, last_nf, stuck, crossed, run_next, packet};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) {
  m.impl("step_begin", &step_begin_cpu);
  m.impl("step_end", &step_end_cpu);
  m.impl("rk_combine", &rk_combine_cpu);
  m.impl("finish_control", &finish_control_cpu);
  m.impl("interpolate", &interpolate_cpu);
  m.impl("adjoint_weights", &adjoint_weights_cpu);
}

}  // namespace fastnode
