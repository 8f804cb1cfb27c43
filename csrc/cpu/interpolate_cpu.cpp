// fastnode::interpolate on CPU: dense output y + h * sum_j w_j(theta) K[j] with per-row weights, parallel over tiles.
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

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("interpolate", &interpolate_cpu); }

}  // namespace fastnode
