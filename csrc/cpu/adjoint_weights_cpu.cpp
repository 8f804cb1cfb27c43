// fastnode::adjoint_weights on CPU: the parameter adjoint's per-sample quadrature weights [S, G].
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

at::Tensor adjoint_weights_cpu(const at::Tensor& h_in, const at::Tensor& accept_in, at::ArrayRef<double> b) {
  TORCH_CHECK(h_in.dim() == 1 && (h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kDouble),
              "fastnode.adjoint_weights: h must be a float32/float64 [G] tensor, got ", h_in.scalar_type(), " ",
              h_in.sizes());
  check_rows(accept_in, h_in, at::kBool, "accept", "adjoint_weights");
  auto h = h_in.contiguous();
  auto acc = accept_in.contiguous();
  const int64_t G = h.size(0), S = static_cast<int64_t>(b.size());
  auto out = at::empty({S, G}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "adjoint_weights_cpu", [&] {
    using T = scalar_t;
    const T* hp = h.data_ptr<T>();
    const bool* ap = acc.data_ptr<bool>();
    T* op = out.data_ptr<T>();
    for (int64_t j = 0; j < S; ++j)
      for (int64_t g = 0; g < G; ++g) op[j * G + g] = (ap[g] ? hp[g] : T(0)) * static_cast<T>(b[j]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CPU, m) { m.impl("adjoint_weights", &adjoint_weights_cpu); }

}  // namespace fastnode
