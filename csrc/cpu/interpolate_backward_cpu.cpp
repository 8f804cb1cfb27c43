// fastnode::interpolate_backward on CPU: the gradients of the dense output out = y + h * sum_j w_j(theta) K[j],
// w_j(theta) = sum_p dense[j, p] theta^(p+1), in one pass over memory: every used stage's gradient
// (h * grad) * w_j(theta) at once and, when asked, the gradients of h and theta per row
// (sum_n grad * sum_j w_j K[j] and h * sum_n grad * sum_j w_j'(theta) K[j]).
// With one row (G = 1) and M > 1 thetas (interpolate's several outputs of one row, grad [M, N]) the stage and step
// gradients are summed over the M outputs in order (the stages' [1, N], h's [1]) and theta's is [M].
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

// The weights w_u(theta_r) and their theta-derivatives for every row r and used stage u, in the state dtype (the
// forward's weights, same formula).
template <typename T>
void dense_weights(const T* thp, int64_t G, at::ArrayRef<double> dense, int64_t P, const std::vector<int64_t>& used,
                   std::vector<T>& W, std::vector<T>& dW) {
  const size_t U = used.size();
  W.assign(static_cast<size_t>(G) * U, T(0));
  dW.assign(W.size(), T(0));
  for (int64_t r = 0; r < G; ++r) {
    for (size_t u = 0; u < U; ++u) {
      T acc = 0, dacc = 0, pw = thp[r], dpw = 1;
      for (int64_t p = 0; p < P; ++p) {
        const T d = static_cast<T>(dense[used[u] * P + p]);
        const T term = pw * d;
        acc = p == 0 ? term : acc + term;
        dacc = dacc + static_cast<T>(p + 1) * d * dpw;
        pw = pw * thp[r];
        dpw = dpw * thp[r];
      }
      W[r * U + u] = acc;
      dW[r * U + u] = dacc;
    }
  }
}

// The M-outputs-of-one-row case: grad [M, N]; every stage's [1, N] gradient sum_r (h * grad_r) * w_u(theta_r), h's
// sum_r sum_n grad_r * a_r and theta_r's h * sum_n grad_r * a'_r (r in order), parallel over column chunks.
void interpolate_backward_many(const at::Tensor& g, const std::vector<at::Tensor>& Kc, const at::Tensor& h,
                               const at::Tensor& th, at::ArrayRef<double> dense, int64_t P, bool need_ht,
                               const std::vector<int64_t>& used, std::vector<at::Tensor>& gk, at::Tensor& gh,
                               at::Tensor& gt) {
  const int64_t M = g.size(0), N = g.size(1);
  const size_t U = used.size();
  Tiles tl(1, N);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_many_cpu", [&] {
    using T = scalar_t;
    std::vector<T> W, dW;
    dense_weights<T>(th.data_ptr<T>(), M, dense, P, used, W, dW);
    std::vector<T*> gp;
    std::vector<const T*> kp;
    stage_pointers<T>(gk, Kc, gp, kp);
    const T* gr = g.data_ptr<T>();
    const T h0 = h.data_ptr<T>()[0];
    // Per (tile, output row): the partial sums of grad_r * a_r and grad_r * a'_r, added up per row afterwards.
    std::vector<T> part_h(need_ht ? static_cast<size_t>(tl.n * M) : 0, T(0)), part_t(part_h.size(), T(0));
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t b, int64_t e) {
      const size_t L = static_cast<size_t>(std::min(N, kChunk));
      std::vector<T> hg(L), a(need_ht ? L : 0), da(a.size()), wr(U), dwr(U);
      for (int64_t t = b; t < e; ++t) {
        const int64_t lo = tl.lo(t), len = tl.hi(t) - lo;
        for (int64_t r = 0; r < M; ++r) {
          const T* gv = gr + r * N + lo;
          for (size_t u = 0; u < U; ++u) {
            wr[u] = W[r * U + u];
            dwr[u] = dW[r * U + u];
          }
          for (int64_t c = 0; c < len; ++c) hg[c] = h0 * gv[c];
          for (size_t u = 0; u < U; ++u) {
            T* o = gp[u] + lo;
            const T wu = wr[u];
            for (int64_t c = 0; c < len; ++c) o[c] = o[c] + hg[c] * wu;
          }
          if (need_ht) {
            lincomb_tile<T>(kp, wr, lo, len, a.data());
            lincomb_tile<T>(kp, dwr, lo, len, da.data());
            T sh = 0, st = 0;
            for (int64_t c = 0; c < len; ++c) {
              sh += gv[c] * a[c];
              st += gv[c] * da[c];
            }
            part_h[t * M + r] = sh;
            part_t[t * M + r] = st;
          }
        }
      }
    });
    if (need_ht) {
      T* ghp = gh.data_ptr<T>();
      T* gtp = gt.data_ptr<T>();
      T sh_all = 0;
      for (int64_t r = 0; r < M; ++r) {
        T sh = 0, st = 0;
        for (int64_t t = 0; t < tl.n; ++t) {
          sh += part_h[t * M + r];
          st += part_t[t * M + r];
        }
        sh_all += sh;
        gtp[r] = h0 * st;
      }
      ghp[0] = sh_all;
    }
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> interpolate_backward_cpu(
    const at::Tensor& grad_in, at::TensorList K, const at::Tensor& h_in, const at::Tensor& theta_in,
    at::ArrayRef<double> dense, int64_t P, bool need_ht) {
  const char* op = "interpolate_backward";
  // `many`: grad [M, N] of M outputs of one row (K [1, N], h [1], theta [M]).
  const bool many = !K.empty() && K[0].dim() == 2 && K[0].size(0) == 1 && grad_in.dim() == 2 && grad_in.size(0) != 1;
  check_stages(many ? K[0] : grad_in, K, 0, op);
  if (many) {
    TORCH_CHECK(grad_in.size(1) == K[0].size(1) && grad_in.scalar_type() == K[0].scalar_type(), "fastnode.", op,
                ": grad must be [M, N] like the stages' N and dtype, got ", grad_in.sizes());
    TORCH_CHECK(theta_in.dim() == 1 && theta_in.size(0) == grad_in.size(0), "fastnode.", op,
                ": theta must be [M] with M = ", grad_in.size(0), ", got ", theta_in.sizes());
  }
  const int64_t S = static_cast<int64_t>(K.size()), D = static_cast<int64_t>(dense.size());
  TORCH_CHECK(P >= 1 && (S == 0 ? D == 0 : (D % S == 0 && D / S == P)), "fastnode.interpolate_backward: dense "
              "must hold S * P = ", K.size(), " * ", P, " values, got ", dense.size());
  check_rows(h_in, many ? K[0] : grad_in, grad_in.scalar_type(), "h", op);
  check_rows(theta_in, grad_in, grad_in.scalar_type(), "theta", op);
  auto g = grad_in.contiguous();
  auto h = h_in.contiguous();
  auto th = theta_in.contiguous();
  std::vector<int64_t> used;
  for (int64_t j = 0; j < S; ++j) {
    bool any = false;
    for (int64_t p = 0; p < P; ++p) any = any || dense[j * P + p] != 0.0;
    if (any) used.push_back(j);
  }
  const size_t U = used.size();
  const int64_t G = g.size(0), N = g.size(1), R = many ? 1 : G;  // R: rows of y, K, h
  std::vector<at::Tensor> gk;
  for (size_t u = 0; u < U; ++u) gk.push_back(many ? at::zeros({1, N}, g.options()) : at::empty_like(g));
  auto gh = need_ht ? at::zeros({R}, g.options()) : at::empty({0}, g.options());
  auto gt = need_ht ? at::zeros({G}, g.options()) : at::empty({0}, g.options());
  if (G * N == 0) return {gk, gh, gt};
  if (many) {
    interpolate_backward_many(g, selected_stages(K, used, need_ht), h, th, dense, P, need_ht, used, gk, gh, gt);
    return {gk, gh, gt};
  }
  const std::vector<at::Tensor> Kc = selected_stages(K, used, need_ht);
  Tiles tl(G, N);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T> W, dW;
    dense_weights<T>(th.data_ptr<T>(), G, dense, P, used, W, dW);
    std::vector<T*> gp;
    std::vector<const T*> kp;
    stage_pointers<T>(gk, Kc, gp, kp);
    const T* gr = g.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    std::vector<T> part_h(need_ht ? static_cast<size_t>(tl.n) : 0, T(0)), part_t(part_h.size(), T(0));
    at::parallel_for(0, tl.n, tl.grain, [&](int64_t b, int64_t e) {
      const size_t L = static_cast<size_t>(std::min(N, kChunk));
      std::vector<T> hg(L), a(need_ht ? L : 0), da(a.size()), wr(U), dwr(U);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = tl.row(t), base = r * N + tl.lo(t), len = tl.hi(t) - tl.lo(t);
        const T* gv = gr + base;
        for (size_t u = 0; u < U; ++u) {
          wr[u] = W[r * U + u];
          dwr[u] = dW[r * U + u];
        }
        stage_grads_tile<T>(gp, wr, base, len, hp[r], gv, hg.data());
        if (need_ht) {
          lincomb_tile<T>(kp, wr, base, len, a.data());
          lincomb_tile<T>(kp, dwr, base, len, da.data());
          T sh = 0, st = 0;
          for (int64_t c = 0; c < len; ++c) {
            sh += gv[c] * a[c];
            st += gv[c] * da[c];
          }
          part_h[t] = sh;
          part_t[t] = st;
        }
      }
    });
    if (need_ht) {
      T* ghp = gh.data_ptr<T>();
      T* gtp = gt.data_ptr<T>();
      for (int64_t r = 0; r < G; ++r) {
        T sh = 0, st = 0;
        for (int64_t c = 0; c < tl.chunks; ++c) {
          sh += part_h[r * tl.chunks + c];
          st += part_t[r * tl.chunks + c];
        }
        ghp[r] = sh;
        gtp[r] = hp[r] * st;
      }
    }
  });
  return {gk, gh, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("interpolate_backward", &interpolate_backward_cpu); }

}  // namespace fastnode
