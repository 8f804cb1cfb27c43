// fastnode::step_begin on CPU: a step's set-up per group (clip to the next stop, stage times), float64 time.
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

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("step_begin", &step_begin_cpu); }

}  // namespace fastnode
