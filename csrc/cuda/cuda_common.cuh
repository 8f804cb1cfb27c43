// Shared by the CUDA implementations of the fastnode ops: the stage list passed by value to a kernel (pointers and
// nonzero weights, at most kMaxStages), the norm segments, the per-element stage combination, launch sizes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace fastnode {

constexpr int kMaxStages = 16;
constexpr int kMaxSegments = 16;
constexpr int kThreads = 256;

template <typename T>
struct Stages {
  const T* k[kMaxStages];
  T w[kMaxStages];
  int n;
};

struct Segments {
  int64_t lo[kMaxSegments];
  int64_t hi[kMaxSegments];
  int n;
};

template <typename T>
inline Stages<T> pack_stages(const std::vector<at::Tensor>& K, at::ArrayRef<double> w) {
  Stages<T> s{};
  s.n = 0;
  for (size_t j = 0; j < w.size(); ++j) {
    if (w[j] == 0.0) continue;  // zero weights skipped, as in the reference
    s.k[s.n] = K[j].data_ptr<T>();
    s.w[s.n] = static_cast<T>(w[j]);
    ++s.n;
  }
  return s;
}

template <typename T>
__device__ __forceinline__ T lincomb(const Stages<T>& s, int64_t i) {
  T acc = 0;
  for (int j = 0; j < s.n; ++j) acc = j == 0 ? s.w[0] * s.k[0][i] : acc + s.w[j] * s.k[j][i];
  return acc;
}

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

inline std::vector<at::Tensor> contiguous(at::TensorList K) {
  std::vector<at::Tensor> out;
  for (const auto& k : K) out.push_back(k.contiguous());
  return out;
}

}  // namespace fastnode
