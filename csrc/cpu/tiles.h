// CPU tiling shared by the fastnode ops: one row x up to kChunk columns per tile, and the stage combinations
// every op runs on a tile (combine_tile: y + h * sum w_j k_j; lincomb_tile: sum w_j k_j), in the reference's
// association so CPU results match TorchStepOps to the rounding of each operation.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace fastnode {

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

// The stages K[j] for j in idx, contiguous; none when they are not read (need false).
inline std::vector<at::Tensor> selected_stages(at::TensorList K, const std::vector<int64_t>& idx, bool need) {
  std::vector<at::Tensor> out;
  if (need)
    for (auto j : idx) out.push_back(K[j].contiguous());
  return out;
}

// Data pointers of the stage gradients (written) and of the stages read (may be none).
template <typename T>
inline void stage_pointers(std::vector<at::Tensor>& gk, const std::vector<at::Tensor>& Kc, std::vector<T*>& gp,
                           std::vector<const T*>& kp) {
  for (auto& t : gk) gp.push_back(t.data_ptr<T>());
  for (const auto& t : Kc) kp.push_back(t.data_ptr<T>());
}

// The stage gradients of a combination y + h * sum_m w_m k_m on one tile: out_m[off + c] = (h * grad[c]) * w_m, with
// the reference's rounding (autograd forms h * grad once, addcmul's backward, then each stage's w_m times it).
// hg: scratch of at least len values.
template <typename T>
inline void stage_grads_tile(const std::vector<T*>& out, const std::vector<T>& w, int64_t off, int64_t len, T h,
                             const T* grad, T* hg) {
  for (int64_t c = 0; c < len; ++c) hg[c] = h * grad[c];
  for (size_t m = 0; m < out.size(); ++m) {
    T* o = out[m] + off;
    const T wm = w[m];
    for (int64_t c = 0; c < len; ++c) o[c] = hg[c] * wm;
  }
}

inline std::vector<at::Tensor> contiguous_stages(at::TensorList K, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t j = 0; j < n; ++j) out.push_back(K[j].contiguous());
  return out;
}

}  // namespace fastnode
