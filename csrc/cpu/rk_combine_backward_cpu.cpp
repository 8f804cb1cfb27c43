// fastnode::rk_combine_backward on CPU: the gradients of out = y + h * sum_j w_j K[j] (rk_combine, and the solution
// of finish_control) in one pass over memory: every stage's gradient (h * grad) * w_j at once and, when asked, the
// step's gradient sum_n grad * sum_j w_j K[j] per row. Parallel over tiles; float32 and float64 states.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "tiles.h"

namespace fastnode {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> rk_combine_backward_cpu(const at::Tensor& grad_in, at::TensorList K,
                                                                         const at::Tensor& h_in,
                                                                         at::ArrayRef<double> w, bool need_h) {
  const char* op = "rk_combine_backward";
  // The stages are read only for the step's gradient (they may be left out, [], otherwise).
  check_stages(grad_in, need_h ? K : at::TensorList(), need_h ? w.size() : 0, op);
  check_rows(h_in, grad_in, grad_in.scalar_type(), "h", op);
  auto g = grad_in.contiguous();
  auto h = h_in.contiguous();
  std::vector<int64_t> idx;
  for (size_t j = 0; j < w.size(); ++j)
    if (w[j] != 0.0) idx.push_back(static_cast<int64_t>(j));
  const size_t M = idx.size();
  std::vector<at::Tensor> gk;
  gk.reserve(M);
  for (size_t m = 0; m < M; ++m) gk.push_back(at::empty_like(g));
  const int64_t G = g.size(0), N = g.size(1);
  auto gh = need_h ? at::zeros({G}, g.options()) : at::empty({0}, g.options());
  if (G * N == 0) return {gk, gh};
  const std::vector<at::Tensor> Kc = selected_stages(K, idx, need_h);
  Tiles tl(G, N);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rk_combine_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T*> gp;
    std::vector<const T*> kp;
    stage_pointers<T>(gk, Kc, gp, kp);
    std::vector<T> wv(M);
    for (size_t m = 0; m < M; ++m) wv[m] = static_cast<T>(w[idx[m]]);
    const T* gr = g.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    // Per tile: the partial sum of grad * (sum_j w_j k_j), added up per row afterwards (a fixed order: the result
    // does not depend on the number of threads).
    std::vector<T> part(need_h ? static_cast<size_t>(tl.n) : 0, T(0));
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t b, int64_t e) {
      std::vector<T> hg(static_cast<size_t>(std::min(N, kChunk))), acc(need_h ? hg.size() : 0);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = tl.row(t), base = r * N + tl.lo(t), len = tl.hi(t) - tl.lo(t);
        const T* gv = gr + base;
        stage_grads_tile<T>(gp, wv, base, len, hp[r], gv, hg.data());
        if (need_h) {
          lincomb_tile<T>(kp, wv, base, len, acc.data());
          T s = 0;
          for (int64_t c = 0; c < len; ++c) s += gv[c] * acc[c];
          part[t] = s;
        }
      }
    });
    if (need_h) {
      T* ghp = gh.data_ptr<T>();
      for (int64_t r = 0; r < G; ++r) {
        T s = 0;
        for (int64_t c = 0; c < tl.chunks; ++c) s += part[r * tl.chunks + c];
        ghp[r] = s;
      }
    }
  });
  return {gk, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("rk_combine_backward", &rk_combine_backward_cpu); }

}  // namespace fastnode
