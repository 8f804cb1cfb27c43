// fastnode::interpolate on CPU: dense output y + h * sum_j w_j(theta) K[j] with per-row weights, parallel over tiles.
// With one row (G = 1) theta may hold M > 1 values: the row's dense output at each, [M, N] (a step's several output
// times at once); each output row is computed exactly as a one-row call with that theta.
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
  // Compared by division: S * P can wrap for a huge P and then match a short dense (reads far out of bounds).
  const int64_t S_ = static_cast<int64_t>(K.size()), D = static_cast<int64_t>(dense.size());
  TORCH_CHECK(P >= 1 && (S_ == 0 ? D == 0 : (D % S_ == 0 && D / S_ == P)), "fastnode.interpolate: dense must hold "
              "S * P = ", K.size(), " * ", P, " values, got ", dense.size());
  check_rows(h_in, y_in, y_in.scalar_type(), "h", op);
  const bool many = y_in.size(0) == 1 && theta_in.dim() == 1 && theta_in.size(0) != 1;
  if (!many) check_rows(theta_in, y_in, y_in.scalar_type(), "theta", op);
  TORCH_CHECK(theta_in.scalar_type() == y_in.scalar_type() && theta_in.device() == y_in.device(), "fastnode.", op,
              ": theta must be ", y_in.scalar_type(), " on ", y_in.device());
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
  // G output rows; row r reads the state, stages and step of row yr(r) (0 for all with `many`).
  const int64_t G = many ? th.size(0) : y.size(0), N = y.size(1);
  auto out = at::empty({G, N}, y.options());
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
        const int64_t r = tl.row(t), yr = many ? 0 : r, len = tl.hi(t) - tl.lo(t);
        const int64_t base = r * N + tl.lo(t), src = yr * N + tl.lo(t);
        for (size_t u = 0; u < U; ++u) wr[u] = W[r * U + u];
        combine_tile<T>(yp + src, kp, wr, 0, src, hp[yr], len, op_ + base);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("interpolate", &interpolate_cpu); }

}  // namespace fastnode
