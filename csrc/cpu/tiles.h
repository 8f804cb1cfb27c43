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

inline std::vector<at::Tensor> contiguous_stages(at::TensorList K, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t j = 0; j < n; ++j) out.push_back(K[j].contiguous());
  return out;
}

}  // namespace fastnode
