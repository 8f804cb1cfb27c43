// fastnode::rk_combine on CPU: y + h * sum_j w_j K[j] (a stage input or the solution) in one pass over memory,
// parallel over tiles (rows x column chunks) with at::parallel_for; float32 and float64 states.
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

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("rk_combine", &rk_combine_cpu); }

}  // namespace fastnode
