// fastnode::step_end on CPU: a step's bookkeeping per group and the loop's host-transfer packet, float64 time.
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

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("step_end", &step_end_cpu); }

}  // namespace fastnode
